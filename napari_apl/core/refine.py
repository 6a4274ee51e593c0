"""Source-free refinement of a dual-head model on one target volume: APL (Algorithm 1) and baselines.

``refine`` is a generator: each iteration it yields a ``RefineEvent`` (losses, mean ω, disagreement,
how many pseudo labels changed, optionally the current pseudo-label volume) and checks a
``RefineControl`` for pause/stop between steps. The CLI drives it with a progress bar; the napari
widget drives it inside a worker thread. It returns a ``RefineResult``. No source image is used.

One APL iteration, as in Algorithm 1 of the paper:

1. predict a batch of target slices with both heads (``p_m``, ``p_a``);
2. relevance R (Eq. 1) and the merged prediction / pseudo label;
3. confidence ω (Eq. 3);
4. classifier step on L_Con (Eq. 2) — the encoder's features are detached, so E is untouched;
5. update the ensemble of pseudo labels (an exponential moving average of merged predictions per
   slice, from which ``ŷ`` and ``ω`` are read);
6. encoder step on L_SSL (Eq. 4) — only the encoder's optimiser steps, the classifiers are untouched.

Engineering beyond the paper (each switchable in ``RefineConfig`` and documented there): batch-norm
statistics re-estimated once on the target volume (AdaBN) and then frozen, pseudo labels from an EMA
teacher on the plain slices while the student learns them from an augmented view, optionally
class-balanced L_SSL, hard user corrections, and a guard that never returns a model whose organs
collapsed to background.

Why these defaults (measured on the real CT ``totalseg/ct_sm`` with a CHAOS-trained source model, on
``totalseg/mr_sm`` and on a CT phantom with the phantom-trained demo model; figures in the issue
note and ``benchmarks/results/mri_to_ct_ablations.md``):

* ``bn="adapt"`` with ``bn_mix=0.25``: with the earlier, under-trained CHAOS source model (14 epochs
  at 3 mm) re-estimating the batch-norm statistics on the target raised the start model's average
  Dice on all three targets (CT 36.0 -> 38.5, mr_sm 28.7 -> 33.7, phantom 55.9 -> 59.2); with
  statistics kept frozen, 200 APL iterations lowered the CT from 36.0 to 33.6, with them re-estimated
  100 iterations raised it to 39.2. With the 30-epoch source model (2.5 mm, CT start 64.9) full
  re-estimation (``bn_mix=1``) alone lowered the CT to 62.2 (spleen 64.7 -> 38.0) and mr_sm from 56.7
  to 52.7, and APL ended at 66.8 with the spleen -15.0. Mixing a quarter target into the source
  statistics (Schneider et al.'s prior; not measured with the 14-epoch model): single APL runs with
  mix 0.5 / 0.25 / frozen gave CT 67.8 / 68.1 / 68.1, mr_sm 55.3 / 55.9 / 56.2, phantom
  58.2 / 58.5 / 58.5. With the current 45-epoch source model (CT start 71.8) every method of the
  benchmark runs with the quarter mix.
  Training-mode batch norm on target batches is the paper's literal reading and is known to hurt
  (38.0 from 47 in the quick trial).
* ``lr=2e-5`` (Adam): ``1e-4`` drove the CT's left kidney and spleen towards background (the guard
  stopped it at iteration 140; 31.0 average Dice).
* ``class_norm=0.5``: with the plain merged argmax APL shrank the organ the start model finds with
  low confidence (CT spleen 25.0 -> 7.8; spleen -13..-22 on three CT phantoms) while the kidneys
  grew; normalising each class by its median confidence (CBST's rule, which is what makes the CBST
  row strong) gave CT 36.0 -> 48.2 with every organ up (one run), and left the phantoms unchanged
  (there the demo model is confident in every class, so k_c ~ 1).
* ``augment="mild"`` with ``class_balance_power=0``: the student learns the teacher's pseudo labels
  from a gamma / bias-field / blur / noise view of each slice (consistency training as in Mean
  Teacher or FixMatch), and L_SSL is unweighted. Single runs (45-epoch model, seed 0), CT / mr_sm /
  CT phantoms 100, 0, 101, changes of average Dice against the start: without augmentation and
  p = 0.25 (the previous default) +1.6 / -2.3 / +3.6 / +2.7 / +3.0; mild, p = 0 +3.8 / -1.0 / +4.9 /
  +3.7 / +3.3; mild, p = 0.25 +5.0 / -4.9 / +3.7; mild plus the geometric view, p = 0
  +5.7 / -5.9 / +6.1 / +1.2 / +3.8; ``domain`` intensities, p = 0.25 +4.5 on the CT. Augmentation
  and the class weights both make organs grow (mr_sm's kidneys, already 2-3x their reference size,
  grow further); mild with p = 0 has the best mean over the five targets and the smallest worst
  case, and no CT organ loses. The geometric view stays an option (``augment_geometry``): on six
  more CT phantoms (seeds 1-6) it gained +3.2 on average against mild's +3.0 (seed by seed -1.7 to
  +1.3), so its CT gain is no reason to switch it on for cross-modality targets.
* ``class_select`` / ``background_select`` off: with a second, GPU-trained source model (CT start
  66.2; benchmarks/results/mri_to_ct_gpu*.md, 3 seeds) CBST's class-wise selection inside APL took
  the CT to 76.3 at portion 0.3 (default APL 68.9, cbst 75.3), but the synthetic pair to 57.7 (default
  60.9) and mr_sm's kidneys down 5-6 points; selecting background pixels only lost on all three
  targets (CT 73.1, phantom 47.0, mr_sm 50.0 against starts of 66.2, 55.9, 59.7). On the CPU in
  float32 (seed 0, same start model) the default gave CT 68.4 and selection at 0.3 76.1, and a
  default run at three times the learning rate 69.0: the selection's gain is not that of larger steps.
  It comes from growing the organs (voxels against the reference's, start -> selection at 0.3, same
  runs): on the CT the under-segmented liver 0.57x -> 1.10x and spleen 0.43x -> 1.19x, but on mr_sm
  the liver 0.87x -> 1.57x (kidneys already 2.1x / 2.7x) and on the phantom the liver 1.51x -> 1.75x
  and the right kidney 0.14x -> 1.62x in 10 pieces. The start model's own probabilities give no
  warning (their sum per organ is within 6 % of its argmax volume on the CT), so no rule seen here
  tells, without labels, when growing helps.
* the EMA teacher (``teacher_decay=0.99``): without it (the paper's Algorithm 1, the student labels
  its own batch) APL gave phantom 30.7 and mr_sm 30.6 against 57.5 and 44.5 with it, and on the CT
  49.9 but with the liver down 6.4 points (one run each).
* ``teacher_bf16`` (auto): the teacher's forwards in bf16 on a CPU with native bf16 gave the same
  Dice within 0.2 on all three targets and cut its cost from 0.30 to 0.17 of a training step.
* ``amp`` (auto): on such a CPU the student trains under bf16 autocast too, as on CUDA: a training
  step in 0.61x its float32 time (benchmarks/results/refine_overhead.md), and over 3 seeds the
  same average Dice to 0.1 on all three targets (CT 70.8,
  synthetic pair 60.7, mr_sm 66.4; every organ within 0.1; benchmarks/results/mri_to_ct_cpu_bf16_student.md).
* the collapse guard checks the returned model's own prediction every ``guard_every`` iterations
  and once more at the end; it restores the last checked state, or the start model.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import pseudo
from .checkpoint import CheckpointMeta
from .errors import APLError
from .infer import PreparedVolume, prepare
from .memory import retained_heap
from .models import DualHeadNet
from .models.fold import FoldedNet
from .preprocess import Normalization
from .train import augment_intensity, random_affine_grid, warp_image, warp_labels
from .utils import release_device_memory, resolve_device, seed_everything
from .volume import Volume

METHODS = ("apl", "apl-con", "threshold", "cbst", "mrnet")
BN_MODES = ("frozen", "train", "adapt")
AUGMENT_MODES = ("none", "mild", "domain")


@dataclass
class RefineConfig:
    """Settings of one refinement run; defaults are the tuned APL recipe."""

    method: str = "apl"
    iterations: int = 400
    """Training steps. For APL 400 beat 100 and 200 on the CT, the synthetic pair and mr_sm, and 800 was
    better on the synthetic pair only, at twice the time (benchmarks/results/explore_iterations*.md);
    every method shares the budget."""
    batch_size: int = 8
    lr: float = 2e-5
    """Learning rate of the encoder step (and of all parameters for the baselines)."""
    lr_classifier: float | None = None
    """Learning rate of the classifier step on L_Con; ``None`` = same as ``lr``."""
    weight: str = "uniform"
    """W of Eq. 1: ``uniform`` (BCDM's discrepancy) or ``confusion`` (the heads' confusion counts)."""
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    """Mixed precision (bf16 autocast, float32 losses); ``None`` = where bf16 is native: CUDA, or a CPU
    whose oneDNN has bf16 kernels (AVX512-BF16 / AMX; there a training step took 0.61x its float32
    time and the masks were the same: benchmarks/results/mri_to_ct_cpu_bf16_student.md), else off."""
    bn: str = "adapt"
    """Batch-norm handling: ``frozen`` (source statistics kept), ``train`` (target batch statistics) or
    ``adapt`` (statistics re-estimated once on the whole target volume, AdaBN, mixed with the
    source's by ``bn_mix``, then frozen)."""
    bn_mix: float = 0.25
    """With ``bn="adapt"``, the target's share of the re-estimated statistics: mean and variance become
    ``bn_mix · target + (1 − bn_mix) · source`` (1 = plain AdaBN, 0 = the source's; a prior on the
    source statistics as in Schneider et al. 2020)."""
    teacher_decay: float = 0.99
    """EMA decay of a teacher copy that makes the pseudo labels; 0 disables the teacher."""
    channels_last: bool = True
    """Keep the student's and the teacher's weights channels-last: oneDNN runs this model's convolutions
    faster so (a training step 557 -> 427 ms, a forward 215 -> 152 ms, unet-dual base 16, 8 slices of
    160 px, 2 CPU threads). On an H100 an iteration took 32.5 and 29.7 ms channels-last against 32.4 ms
    contiguous (the iteration waits on the host), while a bf16 training step was 1.17x faster
    channels-last (benchmarks/results/gpu_check.md). The returned model is contiguous again."""
    teacher_bf16: bool | None = None
    """Run the teacher's no-grad forwards (pseudo labels, guard checks) under bf16 autocast (True) or
    in float32 (False), whatever ``amp``. ``None`` = in bf16 where the student trains in bf16 (``amp``)
    or the CPU's oneDNN has bf16 kernels (AVX512-BF16 / AMX, where it is ~1.6x faster)."""
    ensemble_decay: float = 0.7
    """Weight of the past in the per-slice ensemble of merged predictions (step 5 of Algorithm 1)."""
    class_balance: bool = True
    """Weight L_SSL's classes ∝ 1/frequency^``class_balance_power`` of the pseudo labels."""
    class_balance_power: float = 0.0
    class_balance_volume: bool = False
    """Read the class frequencies of the class balance from the ensemble's labels over the whole volume
    (refreshed every ``guard_every`` iterations) instead of from each batch's pseudo labels."""
    class_norm: float = 0.5
    """When > 0, APL's pseudo label is ``argmax_c p_c / k_c`` with k_c the ``class_norm``-quantile
    confidence of the pixels the ensemble assigns to c (CBST's class-wise normalisation, no pixel
    ignored), so that an organ the start model under-segments with low confidence can grow instead
    of being eaten by its neighbours; 0 = the paper's plain ``argmax(p_m + p_a)``."""
    class_select: bool = False
    """With ``class_norm``, also ignore the pixels whose class-normalised ensemble probability
    ``max_c p_c / k_c`` is below 1 (CBST's selection: about a ``class_norm`` share of each class's
    pixels, its most confident, stay in L_SSL); ω still weighs those. Not the default."""
    background_select: bool = False
    """Like ``class_select`` for the background's pixels only: every organ pixel stays in L_SSL, the
    least confident background (where an under-segmented organ would grow) drops out. Not the default."""
    both_heads_ssl: bool = True
    """Apply L_SSL to both heads' logits (the encoder gets gradients through both)."""
    augment: str = "mild"
    """Intensity augmentation of the student's input (the teacher labels the plain slices): ``none``,
    ``mild`` (gamma, bias field, blur, noise) or ``domain`` (also train-source's random remapping and
    GIN), so that the student learns the pseudo labels from views it has not seen."""
    augment_geometry: bool = False
    """Also rotate, scale and shift the student's view (train-source's ranges, never a flip); the
    pseudo labels and their weights are resampled onto it, and pixels from outside the slice weigh 0."""
    foreground_sampling: float = 0.5
    """Fraction of each batch drawn from slices whose pseudo labels contain an organ."""
    tau: float = 0.9
    """Fixed threshold of the ``threshold`` baseline."""
    cbst_portion: float = 0.2
    cbst_step: float = 0.05
    cbst_max: float = 0.5
    rounds: int = 4
    """Number of pseudo-label regeneration rounds of CBST."""
    mrnet_memory: float = 0.1
    collapse_guard: float = 0.3
    """An organ whose pseudo-label volume falls below this fraction of its start is a collapse."""
    guard_every: int = 20
    guard_spread: bool = False
    """Check the weights of every ``guard_every``-th iteration a few guard slices per iteration over
    the following iterations (on a frozen copy) instead of all at once: the verdict comes a few
    iterations later and the returned model is the same, but no single iteration carries the guard's
    whole prediction (the viewer turns this on so its live overlay keeps refreshing)."""
    guard_min_pixels: int = 100
    """Organs the start model predicts on fewer model-grid pixels than this are not guarded one by one."""
    emit_every: int = 0
    """Attach the current pseudo-label volume to every n-th event (0 = only the last)."""
    normalization: dict | None = None
    """Target intensity normalisation (``Normalization.to_dict``); ``None`` = the checkpoint's."""

    def validate(self) -> RefineConfig:
        """Check the settings and raise a one-line ``APLError`` naming a bad one."""
        if self.method not in METHODS:
            raise APLError(f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.iterations < 0:
            raise APLError("iterations must be 0 or more")
        if self.batch_size < 1:
            raise APLError("batch size must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise APLError(f"learning rate must be a positive number, got {self.lr}")
        if self.lr_classifier is not None and not (
            self.lr_classifier > 0 and math.isfinite(self.lr_classifier)
        ):
            raise APLError(f"lr_classifier must be a positive number or unset, got {self.lr_classifier}")
        if not 0 <= self.foreground_sampling <= 1:
            raise APLError(f"foreground_sampling is a fraction in [0, 1], got {self.foreground_sampling}")
        if self.weight not in ("uniform", "confusion"):
            raise APLError(f"unknown weight '{self.weight}': choose uniform or confusion")
        if self.bn not in BN_MODES:
            raise APLError(f"unknown batch-norm mode '{self.bn}': choose one of {', '.join(BN_MODES)}")
        for name in ("amp", "teacher_bf16"):  # a string such as "off" would read as true
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise APLError(f"{name} must be true, false or unset (auto), got {value!r}")
        for name in ("channels_last", "augment_geometry", "class_balance", "class_balance_volume",
                     "both_heads_ssl", "guard_spread"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):  # ("false" would read as true)
                raise APLError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.augment not in AUGMENT_MODES:
            raise APLError(f"unknown augment '{self.augment}': choose one of {', '.join(AUGMENT_MODES)}")
        if not 0 <= self.bn_mix <= 1:
            raise APLError(f"bn_mix must be in [0, 1], got {self.bn_mix}")
        if not (0 <= self.class_balance_power <= 4):
            raise APLError(f"class_balance_power must be in [0, 4], got {self.class_balance_power}")
        if not 0 <= self.teacher_decay < 1 or not 0 <= self.ensemble_decay < 1:
            raise APLError("teacher and ensemble decays must be in [0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise APLError(f"seed must be a whole number from 0 to 2**64 - 1, got {self.seed!r}")
        if not 0 < self.tau < 1:  # (a pixel passes where its top probability is above tau)
            raise APLError(f"tau is a probability threshold in (0, 1), got {self.tau}")
        if not 0 <= self.class_norm <= 1:
            raise APLError(f"class_norm is a portion in [0, 1], got {self.class_norm}")
        if not (0 < self.cbst_portion <= self.cbst_max <= 1 and 0 <= self.cbst_step <= 1):
            raise APLError("cbst settings need 0 < cbst_portion <= cbst_max <= 1 and 0 <= cbst_step <= 1")
        for name in ("class_select", "background_select"):
            if not isinstance(getattr(self, name), bool):
                raise APLError(f"{name} must be true or false, got {getattr(self, name)!r}")
            if getattr(self, name) and self.method != "apl":
                raise APLError(f"{name} is an option of method apl, not of {self.method}")
            if getattr(self, name) and self.class_norm == 0:
                raise APLError(f"{name} selects by the class-wise k_c: it needs class_norm above 0")
        if self.rounds < 1 or self.guard_every < 1:
            raise APLError("rounds and guard_every must be 1 or more")
        if self.mrnet_memory < 0:
            raise APLError(f"mrnet_memory must be 0 or more, got {self.mrnet_memory}")
        if not 0 <= self.collapse_guard <= 1:
            raise APLError(f"collapse_guard is a fraction in [0, 1], got {self.collapse_guard}")
        if self.guard_min_pixels < 0 or self.emit_every < 0:
            raise APLError("guard_min_pixels and emit_every must be 0 or more")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def for_method(cls, method: str = "apl", **overrides: Any) -> RefineConfig:
        """Return the tuned settings of ``method`` (``METHOD_DEFAULTS``) with ``overrides`` applied."""
        if method not in METHODS:
            raise APLError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
        return cls(method=method, **{**METHOD_DEFAULTS.get(method, {}), **overrides})


METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "apl": {},
    "apl-con": {},
    "threshold": {},
    "cbst": {},
    "mrnet": {},
}
"""Per-method settings that differ from ``RefineConfig``'s defaults (the APL recipe); see ``for_method``."""


class RefineControl:
    """Thread-safe pause / resume / stop switches a refinement checks between its steps."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()

    def stop(self) -> None:
        """Ask the refinement to finish after the current step (also releases a pause)."""
        self._stop.set()
        self._running.set()

    def pause(self) -> None:
        """Hold the refinement after the current step until ``resume`` or ``stop``."""
        self._running.clear()

    def resume(self) -> None:
        """Let a paused refinement go on."""
        self._running.set()

    @property
    def stopped(self) -> bool:
        """Whether a stop was asked for."""
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        """Whether the refinement is held."""
        return not self._running.is_set()

    def wait_if_paused(self, poll: float = 0.05) -> None:
        """Block while paused; return at once when running or stopped."""
        while not self._running.wait(poll):
            if self._stop.is_set():
                return


@dataclass
class RefineEvent:
    """Progress of one refinement iteration."""

    iteration: int
    total: int
    losses: dict[str, float]
    mean_confidence: float
    mean_disagreement: float
    changed_fraction: float
    pseudo: np.ndarray | None = None
    note: str = ""
    labels: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)
    """The ensemble's current pseudo labels on the voxel grid, computed when called (for live views:
    call it before the generator resumes; ``pseudo`` is the same volume, attached every ``emit_every``).
    Once the refinement has ended it raises ``RuntimeError``: a kept event holds none of the loop's
    tensors."""
    checked: Callable[[], tuple[int, dict[str, Any]]] | None = field(default=None, repr=False, compare=False)
    """``(iteration, weights)`` of the newest state the collapse guard passed (of the model the run
    returns: the EMA teacher, or the student without one), weights copied to the CPU when called
    (0: none checked yet). For autosaving a run in progress; call it before the generator resumes.
    Raises ``RuntimeError`` once the refinement has ended."""


@dataclass
class RefineResult:
    """What a refinement returns: the refined model, the ensemble's pseudo labels and the history."""

    model: DualHeadNet
    pseudo: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    iterations_done: int = 0
    notes: list[str] = field(default_factory=list)
    organ_voxels: dict[str, list[int]] = field(default_factory=dict)
    """Voxels per class (on the model grid, whole target) of the merged prediction of the model passed
    in (``"start"``, before any batch-norm re-estimation) and of the returned model (``"refined"``)."""


def organ_size_change(result: RefineResult, class_names: Sequence[str]) -> str:
    """One line: how much each organ's predicted size changed from the starting model to the refined one."""
    start, end = result.organ_voxels.get("start"), result.organ_voxels.get("refined")
    if not start or not end:
        return ""
    parts = []
    for c in range(1, min(len(start), len(end), len(class_names))):
        if start[c] == 0:
            parts.append(f"{class_names[c]} {'none' if end[c] == 0 else f'new ({end[c]} voxels)'}")
        else:
            parts.append(f"{class_names[c]} {100.0 * (end[c] - start[c]) / start[c]:+.0f}%")
    return "organ size vs the starting model: " + ", ".join(parts)


# --- helpers ------------------------------------------------------------------------------------------


def _set_bn_eval(model: torch.nn.Module) -> None:
    """Put every batch-norm layer in eval mode so its running statistics stay those of the source."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _train_mode(model: DualHeadNet, bn: str) -> None:
    """Switch the model to training mode with the chosen batch-norm handling."""
    model.train()
    if bn in ("frozen", "adapt"):
        _set_bn_eval(model)


@torch.no_grad()
def _ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """Move the teacher's weights toward the student's (buffers are copied)."""
    t_params = list(teacher.parameters())
    torch._foreach_mul_(t_params, decay)
    torch._foreach_add_(t_params, [s.detach() for s in student.parameters()], alpha=1 - decay)
    t_buffers = list(teacher.buffers())
    if t_buffers:  # the foreach ops refuse empty lists
        torch._foreach_copy_(t_buffers, list(student.buffers()))


@torch.no_grad()
def _adapt_bn(
    model: torch.nn.Module,
    xs: torch.Tensor,
    dev: torch.device,
    mix: float = 1.0,
    batch: int = 16,
    cancelled: Callable[[], None] | None = None,
) -> None:
    """Re-estimate every batch-norm layer's running statistics on the target slices (AdaBN).

    ``mix`` < 1 keeps part of the source statistics: ``mix · target + (1 − mix) · source``.
    ``cancelled`` is called before each batch (it raises to stop; the statistics are then unusable).
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    source = [(m.running_mean.clone(), m.running_var.clone()) if mix < 1 else None for m in bns]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    model.eval()  # (dropout off: the statistics are those of the forward that predicts)
    for m in bns:
        m.train()
    seen = 0
    for s in range(0, xs.shape[0], batch):
        if cancelled is not None:
            cancelled()
        x = xs[s : s + batch]
        for m in bns:  # each batch weighs as its slices: a short last batch counts for what it holds
            m.momentum = x.shape[0] / (seen + x.shape[0])
        model(x.to(dev))
        seen += x.shape[0]
    for m, kept, momentum in zip(bns, source, momenta, strict=True):
        m.momentum = momentum
        if kept is not None:
            m.running_mean.mul_(mix).add_(kept[0], alpha=1 - mix)
            m.running_var.mul_(mix).add_(kept[1], alpha=1 - mix)
    model.eval()


def amp_enabled(setting: bool | None, dev: torch.device) -> bool:
    """Whether a refinement on ``dev`` trains under bf16 autocast (``RefineConfig.amp``; ``None``: where
    bf16 is native)."""
    if setting is not None:
        return bool(setting)
    if dev.type == "cuda":
        return True
    return dev.type == "cpu" and _cpu_has_native_bf16()


def no_grad_bf16(cfg: RefineConfig, dev: torch.device) -> bool:
    """Whether a refinement's no-grad forwards (the teacher's pseudo labels, guard checks, organ counts)
    run under bf16 autocast: an explicit ``teacher_bf16`` decides whatever ``amp`` (with a teacher);
    else they follow the student's precision, or bf16 where the CPU has it natively."""
    if cfg.teacher_decay > 0 and cfg.teacher_bf16 is not None:
        return bool(cfg.teacher_bf16)
    return amp_enabled(cfg.amp, dev) or (cfg.teacher_decay > 0 and _teacher_bf16(None, dev))


def _teacher_bf16(setting: bool | None, dev: torch.device) -> bool:
    """Whether the teacher's forwards run under bf16 autocast (``None``: where bf16 is native)."""
    if setting is not None:
        return bool(setting)
    if dev.type == "cpu":
        return _cpu_has_native_bf16()
    return False  # CUDA: the teacher follows ``amp`` like everything else


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX) and oneDNN uses it.

    oneDNN also runs bf16 on plain AVX-512 by emulation, slower than float32: that does not count.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: keep float32
        return False
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    return native and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _organ_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return voxel counts per class of a label tensor."""
    return torch.bincount(labels.reshape(-1).long(), minlength=num_classes)[:num_classes]


def _finite(model: torch.nn.Module) -> bool:
    """Whether every parameter and buffer of ``model`` is finite."""
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    # the largest |value| of each tensor in one fused pass: inf where any is inf, nan where any is nan
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, ord=math.inf))).all())


@dataclass
class _GuardCheck:
    """A collapse check under way: the weights of one iteration and the guard slices' counts so far."""

    iteration: int
    state: dict[str, Any]
    counts: torch.Tensor
    done: int = 0


class _Ensemble:
    """The ensemble of target pseudo labels: an EMA of merged probabilities per slice on the model grid.

    Besides the probabilities it keeps their argmax per pixel and a per-slice "holds an organ" flag,
    both updated for the slices of each batch, so that nothing per iteration scans the whole volume.
    """

    def __init__(self, n_slices: int, num_classes: int, hw: tuple[int, int], decay: float) -> None:
        self.prob = torch.zeros((n_slices, num_classes, *hw), dtype=torch.float16)
        self.label = torch.zeros((n_slices, *hw), dtype=torch.uint8)  # argmax of prob (0 while unseen)
        self.foreground = torch.zeros(n_slices, dtype=torch.bool)  # whether label > 0 anywhere in a slice
        self.seen = torch.zeros(n_slices, dtype=torch.bool)
        self.decay = decay

    def update(self, idx: list[int], merged: torch.Tensor) -> torch.Tensor:
        """Blend new merged predictions for slices ``idx``; return the fraction of labels that changed."""
        new = merged.detach().to("cpu", torch.float32)
        old = self.prob[idx].float()
        seen = self.seen[idx].reshape(-1, 1, 1, 1)
        blended = torch.where(seen, self.decay * old + (1 - self.decay) * new, new)
        self.prob[idx] = blended.to(torch.float16)
        label = pseudo.class_argmax(self.prob[idx]).to(torch.uint8)  # read back: a repeated slice wrote once
        changed = (self.label[idx] != label) & seen.reshape(-1, 1, 1)  # of the stored labels
        self.label[idx] = label
        self.foreground[idx] = (label > 0).flatten(1).any(1)
        self.seen[idx] = True
        return changed.float().mean()

    def get(self, idx: list[int], device: torch.device) -> torch.Tensor:
        """Return the ensemble probabilities of slices ``idx`` as float32 on ``device``."""
        return self.prob[idx].to(device, torch.float32)

    def labels(self) -> torch.Tensor:
        """Return the ensemble's pseudo labels for all slices ``(Z, H, W)`` uint8."""
        return self.label.clone()

    def foreground_slices(self) -> list[int]:
        """Return the indices of the slices whose pseudo labels hold an organ."""
        return torch.nonzero(self.foreground).flatten().tolist()

    def class_thresholds(self, portion: float) -> torch.Tensor:
        """Return CBST's k_c over the whole ensemble (``pseudo.cbst_thresholds`` of its float32 prob)."""
        lab = self.label.long()
        top = self.prob.gather(1, lab.unsqueeze(1)).squeeze(1)  # float16, as stored
        return pseudo.class_quantiles_f16(top, lab, self.prob.shape[1], portion)


def check_corrections(
    corrections: np.ndarray, class_names: Sequence[str], where: str = "the corrections"
) -> None:
    """Raise a one-line ``APLError`` if a corrections volume holds a value that is neither -1 (untouched)
    nor one of the model's classes (e.g. label 5 from napari's "new label" button)."""
    corr = np.asarray(corrections)
    n = len(class_names)
    if corr.size == 0 or (-1 <= corr.min() and corr.max() < n):
        return
    bad = np.unique(corr[(corr < -1) | (corr >= n)])
    label = int(bad[0])
    classes = ", ".join(f"{i} {name}" for i, name in enumerate(class_names))
    raise APLError(
        f"label {label} in {where} is not one of the model's classes ({classes}): erase those voxels "
        "or paint them with one of these labels"
    )


def _grid_corrections(
    prep: PreparedVolume, corrections: np.ndarray | None, class_names: Sequence[str]
) -> torch.Tensor | None:
    """Map a canonical corrections volume (-1 = untouched) onto the model grid ``(Z, H, W)`` int64."""
    if corrections is None:
        return None
    corr = np.asarray(corrections)
    if corr.shape != tuple(prep.volume.data.shape):
        raise APLError(
            f"corrections have shape {corr.shape} but the volume has {tuple(prep.volume.data.shape)}: "
            "paint on a layer made from this image"
        )
    check_corrections(corr, class_names)
    if not (corr >= 0).any():
        return None
    t = torch.from_numpy(np.moveaxis(corr.astype(np.float32), 2, 0)).unsqueeze(1)
    g = prep.grid.forward(t, mode="nearest", pad_value=-1.0)
    return g[:, 0].round().long()


_REUSE_OWN_FORWARD = True  # switch for the test that proves the shortcut changes nothing
# On the CPU the teacher's and the guard's no-grad forwards run on a copy with the batch norms folded
# into the convolutions (models.fold): the same function, without a pass over every activation per batch
# norm. Not on CUDA, where an iteration waits on the host and refreshing the copy launches more kernels
# than the batch norms it saves (an H100 at 264e9a5: APL iterations 1.09x slower folded,
# benchmarks/results/refine_overhead_cuda.md). ``None``: that rule; True or False force it (for the benchmark
# that measures the difference and the test that checks it changes nothing).
_FOLD_BN: bool | None = None


def _to_volume(prep: PreparedVolume, labels_zhw: torch.Tensor) -> np.ndarray:
    """Map model-grid labels ``(Z, H, W)`` back onto the canonical voxel grid ``(X, Y, Z)`` uint8.

    The result is Fortran-ordered (each axial slice contiguous), so napari's ``(Z, Y, X)`` layer order
    is a view of it and a copy in that order is a plain memory copy.
    """
    out = np.empty(tuple(prep.volume.data.shape), np.uint8, order="F")
    grid = prep.grid
    (bx, by), (rx, ry), (nx, ny) = grid.pad_before, grid.resampled_shape, grid.in_shape
    xi, yi = _nearest_index(rx, nx) + bx, _nearest_index(ry, ny) + by
    low = labels_zhw.to(torch.uint8).transpose(1, 2)  # (Z, W, H): gathered straight into (n, Y, X)
    for start in range(0, low.shape[0], 32):  # a uint8 gather: out[x, y, z] = labels[z, xi[x], yi[y]]
        out.T[start : start + 32] = low[start : start + 32].index_select(1, yi).index_select(2, xi).numpy()
    return out


def _nearest_index(n_in: int, n_out: int) -> torch.Tensor:
    """Source index of each output pixel of nearest-neighbour resampling ``n_in -> n_out``.

    Computed by the same float32 kernel (``nearest-exact`` on a 2-D image) that resampling float label
    maps uses, so that ties at pixel centres fall the same way.
    """
    src = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in, 1)
    return F.interpolate(src, size=(n_out, 1), mode="nearest-exact").view(n_out).long()


def _fold_bn(dev: torch.device) -> bool:
    """Whether the no-grad forwards of a refinement on ``dev`` run on folded copies (``_FOLD_BN``)."""
    return dev.type == "cpu" if _FOLD_BN is None else _FOLD_BN


def _probs(
    net: torch.nn.Module, x: torch.Tensor, dev: torch.device, low: bool, bn: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both heads' probabilities of ``net`` for the model-grid slices ``x`` (inference mode, bf16 if
    ``low``); a network in training mode goes back to it with the batch-norm handling ``bn``."""
    was = net.training
    net.eval()
    with torch.inference_mode(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=low):
        m, a = net(x.to(dev))
    if was:  # back to training with the configured batch-norm handling (train() alone would undo it)
        _train_mode(net, bn)
    return torch.softmax(m.float(), 1), torch.softmax(a.float(), 1)


class _Cancelled(Exception):
    """``prepare_refinement`` was cancelled."""


def setup_key(cfg: RefineConfig) -> tuple:
    """The settings a refinement's set-up depends on (a ``RefineStart`` fits the runs that share them)."""
    import json

    dev = resolve_device(cfg.device)
    return (
        str(dev),
        json.dumps(cfg.normalization, sort_keys=True),
        cfg.bn,
        cfg.bn_mix if cfg.bn == "adapt" else None,
        bool(cfg.channels_last),
        cfg.teacher_decay > 0,
        no_grad_bf16(cfg, dev),
        _fold_bn(dev),
    )


def _probe_slices(volume: Volume) -> np.ndarray:
    """Three axial slices of ``volume`` (first, middle, last): the check that a start is of this scan."""
    z = int(volume.data.shape[2])
    return np.stack([np.asarray(volume.data[:, :, k]) for k in sorted({0, z // 2, z - 1})])


def _voxel_digest(volume: Volume) -> int | None:
    """CRC-32 of the memory holding an in-memory volume's voxels (``None`` for lazy data).

    It is taken of the whole array the voxels are a view of (a layer's data, seen in canonical order):
    any voxel changed in place changes it. About 0.02 s for 150 MB here.
    """
    import zlib

    data = volume.data
    if not isinstance(data, np.ndarray):
        return None
    root = data
    while isinstance(root.base, np.ndarray):
        root = root.base
    if root.flags.c_contiguous or root.flags.f_contiguous:
        return zlib.crc32(memoryview(np.ravel(root, order="K")).cast("B"))
    crc = 0
    for k in range(data.shape[2]):  # (strided memory: slice by slice)
        crc = zlib.crc32(np.ascontiguousarray(data[:, :, k]).data, crc)
    return crc


@dataclass
class RefineStart:
    """A refinement's set-up, made ahead of it by ``prepare_refinement`` (e.g. while the user looks at
    the prediction): the target's slices on the model grid, the student with its batch-norm statistics
    re-estimated, the teacher and its folded copy, and the initial ensemble of pseudo labels.

    It fits (``fits``) a refinement of the same weights (compared tensor by tensor), checkpoint
    metadata, set-up settings (``setup_key``) and torch thread count (of the thread that made it and
    of the one that refines) on the same scan: shape, affine and voxels as they were when the set-up
    began (a CRC of in-memory voxels; of lazy ones three slices are compared). The copies in it are the ones a
    refinement trains, so a start serves one refinement (``take``).
    """

    key: tuple
    threads: int
    meta: CheckpointMeta
    start_state: dict[str, torch.Tensor]
    probe: np.ndarray
    digest: int | None
    affine: np.ndarray
    student: DualHeadNet
    prep: PreparedVolume
    xs: torch.Tensor
    teacher: DualHeadNet | None
    teacher_fast: FoldedNet | None
    ensemble: _Ensemble
    used: bool = False

    def fits(self, model: DualHeadNet, meta: CheckpointMeta, volume: Volume, cfg: RefineConfig) -> str:
        """Why this start cannot begin a refinement of ``model`` on ``volume`` with ``cfg`` ("" if it can)."""
        if self.used:
            return "it was used by a refinement already"
        if not self.probe.size:
            return "it was made by a refinement, not ahead of one"
        if self.key != setup_key(cfg):
            return "the refinement's settings changed"
        if self.threads != torch.get_num_threads():  # (sums over threads round differently)
            return "another number of torch threads"
        if meta != self.meta:
            return "another checkpoint"
        state = model.state_dict()
        if state.keys() != self.start_state.keys() or not all(
            torch.equal(v.detach().to(self.start_state[k].device), self.start_state[k])
            for k, v in state.items()
        ):
            return "the model's weights changed"
        if tuple(volume.data.shape) != tuple(self.prep.volume.data.shape) or not np.allclose(
            volume.affine, self.affine
        ):
            return "another scan"
        if _voxel_digest(volume) != self.digest or not np.array_equal(_probe_slices(volume), self.probe):
            return "the scan's voxels changed"
        return ""

    def take(self, model: DualHeadNet, meta: CheckpointMeta, volume: Volume, cfg: RefineConfig) -> bool:
        """Mark the start used and return True if it fits this refinement (``fits``); else False."""
        if self.fits(model, meta, volume, cfg):
            return False
        self.used = True
        return True


def _set_up(
    model: DualHeadNet,
    meta: CheckpointMeta,
    volume: Volume,
    cfg: RefineConfig,
    dev: torch.device,
    cancelled: Callable[[], bool] | None = None,
    ahead: bool = False,
) -> RefineStart:
    """Make a refinement's set-up: prepared slices, student (batch norms re-estimated), teacher, ensemble.

    ``ahead``: for a later refinement, which checks the scan against the voxels read here (a refinement
    making its own set-up skips that reading: a lazy file's last slice, say, read out of order).
    """

    def check() -> None:
        if cancelled is not None and cancelled():
            raise _Cancelled

    norm = Normalization.from_dict(cfg.normalization) if cfg.normalization else None
    # the scan as the set-up reads it, taken first: voxels changed while it runs make it not fit
    probe, digest = (_probe_slices(volume), _voxel_digest(volume)) if ahead else (np.empty(0), None)
    start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    student = copy.deepcopy(model).to(dev)
    if cfg.channels_last:
        student.to(memory_format=torch.channels_last)
    prep = prepare(volume, meta, student, norm)
    n_slices = int(volume.data.shape[2])

    # Target slices on the model grid, prepared once (small: Z x H x W float32).
    parts = []
    for s in range(0, n_slices, 32):
        check()
        parts.append(prep.batch(list(range(s, min(s + 32, n_slices)))))
    xs = torch.cat(parts)
    hw = (int(xs.shape[-2]), int(xs.shape[-1]))

    # With a teacher, every no-grad prediction is the teacher's (or a frozen copy of it, or the loaded
    # model's) and runs at the teacher's precision (bf16 where native).
    low = no_grad_bf16(cfg, dev)
    if cfg.bn == "adapt":
        _adapt_bn(student, xs, dev, cfg.bn_mix, cancelled=check)

    teacher: DualHeadNet | None = None
    teacher_fast: FoldedNet | None = None
    if cfg.teacher_decay > 0:
        teacher = copy.deepcopy(student).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if _fold_bn(dev):
            teacher_fast = FoldedNet(teacher)

    # Initial ensemble over the whole volume: the start model's pseudo labels.
    ensemble = _Ensemble(n_slices, len(meta.class_names), hw, cfg.ensemble_decay)
    if teacher is not None:
        source: torch.nn.Module = teacher
        if teacher_fast is not None:
            teacher_fast.refresh(teacher.state_dict())
            source = teacher_fast
    else:
        source = student
    for s in range(0, n_slices, 16):
        check()
        idx = list(range(s, min(s + 16, n_slices)))
        pm, pa = _probs(source, xs[idx], dev, low, cfg.bn)
        ensemble.update(idx, pseudo.merge(pm, pa))
    return RefineStart(
        key=setup_key(cfg),
        threads=torch.get_num_threads(),
        meta=meta,
        start_state=start_state,
        probe=probe,
        digest=digest,
        affine=np.array(volume.affine, dtype=float),
        student=student,
        prep=prep,
        xs=xs,
        teacher=teacher,
        teacher_fast=teacher_fast,
        ensemble=ensemble,
    )


def prepare_refinement(
    model: DualHeadNet,
    meta: CheckpointMeta,
    volume: Volume,
    config: RefineConfig | None = None,
    *,
    cancelled: Callable[[], bool] | None = None,
) -> RefineStart | None:
    """Make the set-up of a refinement ahead of it, for ``refine(..., start=...)`` (None if cancelled).

    This is the work a refinement does before its first iteration (on a 512 x 512 x 96 CT with the
    demo model about 1.5 s on 2 CPU cores): preparing the slices, re-estimating the batch-norm
    statistics and the initial pseudo labels. Done while the user looks at the prediction, the first
    iteration, and its live overlay, follow the click at once. The refinement's numbers are the same.
    ``cancelled`` is polled between batches. The model passed in is not modified.
    """
    cfg = (config or RefineConfig()).validate()
    dev = resolve_device(cfg.device)
    try:
        # (as in refine: the batches' freed activations are reused, and given back to the system at the
        # end; in a thread of its own glibc would otherwise keep them in that thread's arena)
        with retained_heap():
            return _set_up(model, meta, volume, cfg, dev, cancelled, ahead=True)
    except _Cancelled:
        return None
    finally:  # an accelerator's cache keeps only what the start holds (the copies of the model)
        release_device_memory(dev)


# --- the loop -----------------------------------------------------------------------------------------


def refine(
    model: DualHeadNet,
    meta: CheckpointMeta,
    volume: Volume,
    config: RefineConfig | None = None,
    *,
    control: RefineControl | None = None,
    corrections: np.ndarray | None = None,
    start: RefineStart | None = None,
) -> Generator[RefineEvent, None, RefineResult]:
    """Refine ``model`` on ``volume`` without labels, yielding a ``RefineEvent`` per iteration.

    The model passed in is not modified: a copy is trained and returned in the result. Stopping
    through ``control`` ends the loop after the current step and still returns a usable model.
    ``start``: the set-up made ahead by ``prepare_refinement``, used when it fits (same weights, volume
    and set-up settings; the result is then the same as without it), else the set-up is made here.
    The accelerator's cached memory is given back once the loop's own tensors are gone (at the end,
    after a stop, or when the generator is closed early).
    """
    cfg = (config or RefineConfig()).validate()
    dev = resolve_device(cfg.device)  # (an unusable device is refused here, before anything runs)
    live = _EventSources()
    try:
        # the loop runs in its own generator, whose frame (optimiser states, guard copies, batches on
        # the device) is freed when it returns: only then can the cache be emptied
        # freed activations stay in the process for the next iteration (memory.retained_heap)
        with retained_heap():
            return (yield from _refine_loop(model, meta, volume, cfg, dev, control, corrections, live, start))
    finally:
        live.close()  # an event the caller keeps must not hold the ensemble or weight copies on the device
        release_device_memory(dev)


class _EventSources:
    """What the events' ``labels`` and ``checked`` read while the loop runs; emptied when it ends."""

    def __init__(self) -> None:
        self._labels: Callable[[], np.ndarray] | None = None
        self._checked: Callable[[], tuple[int, dict[str, Any]]] | None = None

    def attach(
        self, labels: Callable[[], np.ndarray], checked: Callable[[], tuple[int, dict[str, Any]]]
    ) -> None:
        """Point the events at the running loop's pseudo labels and guard-checked weights."""
        self._labels, self._checked = labels, checked

    def close(self) -> None:
        """Drop the loop's state, so that events kept after the end keep no tensors alive."""
        self._labels = self._checked = None

    def labels(self) -> np.ndarray:
        """The ensemble's current pseudo labels on the voxel grid."""
        if self._labels is None:
            raise RuntimeError("this refinement has ended: its result holds the final pseudo labels")
        return self._labels()

    def checked(self) -> tuple[int, dict[str, Any]]:
        """The newest guard-checked weights, copied to the CPU."""
        if self._checked is None:
            raise RuntimeError("this refinement has ended: its result holds the returned model")
        return self._checked()


def _refine_loop(
    model: DualHeadNet,
    meta: CheckpointMeta,
    volume: Volume,
    cfg: RefineConfig,
    dev: torch.device,
    control: RefineControl | None,
    corrections: np.ndarray | None,
    live: _EventSources,
    start: RefineStart | None = None,
) -> Generator[RefineEvent, None, RefineResult]:
    """The body of ``refine`` (``cfg`` validated, ``dev`` its device, ``live`` its events' sources)."""
    ctl = control or RefineControl()
    use_amp = amp_enabled(cfg.amp, dev)
    rng = seed_everything(cfg.seed)
    s = start if start is not None and start.take(model, meta, volume, cfg) else None
    if s is None:
        s = _set_up(model, meta, volume, cfg, dev)
    start_state, student, prep, xs, ensemble = s.start_state, s.student, s.prep, s.xs, s.ensemble
    teacher, teacher_fast = s.teacher, s.teacher_fast  # (teacher_fast: batch norms folded, for its forwards)
    del s  # (the loop's objects from now on: a start is used once)
    ensemble.decay = cfg.ensemble_decay  # (the initial pass does not depend on it)
    n_slices = int(volume.data.shape[2])
    num_classes = len(meta.class_names)
    hw = (int(xs.shape[-2]), int(xs.shape[-1]))
    corr = _grid_corrections(prep, corrections, meta.class_names)
    low = no_grad_bf16(cfg, dev)
    fold_bn = _fold_bn(dev)

    def fast_teacher() -> FoldedNet:
        """The folded copy of the teacher, refreshed from the teacher's current weights."""
        assert teacher is not None and teacher_fast is not None
        teacher_fast.refresh(teacher.state_dict())
        return teacher_fast

    def predict_probs(
        net: torch.nn.Module, x: torch.Tensor, folded: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return both heads' probabilities for the slices ``x`` on the model grid (inference mode); the
        teacher's on its folded copy unless ``folded`` is False."""
        if net is teacher and teacher_fast is not None and folded:
            net = fast_teacher()
        return _probs(net, x, dev, low, cfg.bn)

    def label_counts(net: DualHeadNet, idx: Sequence[int]) -> torch.Tensor:
        """Voxel count per class of ``net``'s merged prediction on the slices ``idx`` (model grid).

        Always the network itself, never a folded copy: the loaded model's and the returned model's
        counts are compared, and in bf16 folding rounds differently (an unchanged model must count the
        same)."""
        counts = torch.zeros(num_classes, dtype=torch.long)
        for s in range(0, len(idx), 16):
            pm, pa = predict_probs(net, xs[list(idx[s : s + 16])], folded=False)
            counts += _organ_counts(pseudo.class_argmax(pseudo.merge(pm, pa)).cpu(), num_classes)
        return counts

    # Without a teacher the student labels its own batch. With batch-norm statistics fixed and no
    # active dropout its training forward computes exactly its inference forward, so the pseudo labels
    # are read from the forward the classifier step makes anyway (bit-identical, one forward saved).
    reuse_own_forward = (
        _REUSE_OWN_FORWARD
        and teacher is None
        and cfg.augment == "none"
        and not cfg.augment_geometry  # (the student's forward is then of another view than the plain slice)
        and cfg.bn in ("adapt", "frozen")
        and not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in student.modules())
    )
    start_labels = ensemble.labels()
    # The collapse guard watches the returned model's own prediction on up to 64 slices (those where
    # the start model finds an organ, spread evenly), not the lagging ensemble.
    fg_slices = ensemble.foreground_slices() or list(range(n_slices))
    guard_idx = [fg_slices[int(i)] for i in np.linspace(0, len(fg_slices) - 1, min(64, len(fg_slices)))]
    guard_idx = sorted(set(guard_idx))

    def guard_counts(net: DualHeadNet, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Voxel count per class of ``net``'s merged prediction on the guard slices ``lo:hi``."""
        return label_counts(net, guard_idx[lo:hi])

    start_counts = _organ_counts(start_labels[guard_idx], num_classes)
    start_organs = [c for c in range(1, num_classes) if start_counts[c] >= cfg.guard_min_pixels]
    start_fg = int(start_counts[1:].sum())

    def collapsed_in(counts: torch.Tensor) -> list[int]:
        """Organs whose predicted area fell below ``collapse_guard`` of the start's (0 = all foreground).

        Organs the start model barely finds (fewer than ``guard_min_pixels``) are too noisy to guard one
        by one; the foreground as a whole always is, so an all-background model is always caught.
        """
        out = [c for c in start_organs if counts[c] < cfg.collapse_guard * start_counts[c]]
        if start_fg > 0 and int(counts[1:].sum()) < cfg.collapse_guard * start_fg:
            out.append(0)
        return out

    def collapsed_organs(net: DualHeadNet) -> list[int]:
        """``collapsed_in`` of ``net``'s prediction on all guard slices."""
        return collapsed_in(guard_counts(net))

    # A check under way (``guard_spread``): the weights of one iteration in a frozen copy, and the
    # counts of the guard slices predicted so far. Without spreading it is done in its own iteration.
    guard_key = "teacher" if teacher is not None else "student"
    guard_net: torch.nn.Module | None = None
    check: _GuardCheck | None = None
    per_iteration = (
        max(1, math.ceil(len(guard_idx) / cfg.guard_every)) if cfg.guard_spread else len(guard_idx)
    )

    def begin_check(at: int) -> _GuardCheck:
        """Freeze the weights of iteration ``at`` for a collapse check and predict its first slices."""
        nonlocal guard_net
        state = snapshot()
        if guard_net is None:
            src = teacher if teacher is not None else student
            guard_net = FoldedNet(src) if fold_bn else copy.deepcopy(src).eval()
        if isinstance(guard_net, FoldedNet):
            guard_net.refresh(state[guard_key])
        else:
            guard_net.load_state_dict(state[guard_key])
        chk = _GuardCheck(at, state, torch.zeros(num_classes, dtype=torch.long))
        advance(chk, per_iteration)
        return chk

    def settle(chk: _GuardCheck) -> tuple[_GuardCheck | None, str]:
        """Apply a finished check's verdict (keep its state, or restore the last good one and stop).

        Returns the check while it is still under way, else ``None``, and the note of a collapse.
        """
        nonlocal good_state, good_iter, stopped
        if chk.done < len(guard_idx):
            return chk, ""
        collapsed = collapsed_in(chk.counts)
        if not collapsed:
            good_state, good_iter = chk.state, chk.iteration
            return None, ""
        restore(good_state)
        names = ", ".join(meta.class_names[c] if c else "all organs" for c in collapsed)
        msg = f"{names} collapsing at iteration {chk.iteration}: restored iteration {good_iter} and stopped"
        notes.append(msg)
        stopped = True
        return None, msg

    def advance(chk: _GuardCheck, n: int) -> None:
        """Predict the next ``n`` guard slices of a check with its frozen weights."""
        hi = min(len(guard_idx), chk.done + n)
        chk.counts += guard_counts(guard_net, chk.done, hi)
        chk.done = hi

    enc_params = list(student.encoder_parameters())
    cls_params = list(student.classifier_parameters())
    lr_cls = cfg.lr_classifier if cfg.lr_classifier is not None else cfg.lr
    if cfg.method in ("apl", "apl-con"):
        opt_cls = torch.optim.Adam(cls_params, lr=lr_cls)
        opt_enc = torch.optim.Adam(enc_params, lr=cfg.lr)
        opt_all = None
    else:
        opt_cls = opt_enc = None
        opt_all = torch.optim.Adam(enc_params + cls_params, lr=cfg.lr)

    history: list[dict[str, Any]] = []
    notes: list[str] = []

    def snapshot() -> dict[str, Any]:
        """Copy the student's and the teacher's weights."""
        snap = {"student": {k: v.detach().clone() for k, v in student.state_dict().items()}}
        if teacher is not None:
            snap["teacher"] = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        return snap

    def restore(snap: dict[str, Any]) -> None:
        """Load weights saved by ``snapshot``."""
        student.load_state_dict(snap["student"])
        if teacher is not None:
            teacher.load_state_dict(snap["teacher"])

    good_state = snapshot()
    good_iter = 0

    def checked_weights() -> tuple[int, dict[str, Any]]:
        """The newest guard-checked weights (of the model a stop would return), copied to the CPU."""
        return good_iter, {k: v.to("cpu", copy=True) for k, v in good_state[guard_key].items()}

    live.attach(lambda: _to_volume(prep, ensemble.labels()), checked_weights)

    cbst_k: torch.Tensor | None = None
    class_k: torch.Tensor | None = None
    volume_cw: torch.Tensor | None = None
    round_len = max(1, cfg.iterations // max(1, cfg.rounds))

    aug_gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    aug_probs = (0.4, 0.5) if cfg.augment == "domain" else (0.0, 0.0)  # train-source's remap / GIN

    def sample_batch() -> list[int]:
        """Draw a batch of slice indices, part of it from slices whose pseudo labels hold an organ."""
        fg = ensemble.foreground_slices()
        n_fg = round(cfg.batch_size * cfg.foreground_sampling) if fg else 0
        pick = list(rng.choice(fg, size=n_fg, replace=len(fg) < n_fg)) if n_fg else []
        pick += list(rng.integers(0, n_slices, size=cfg.batch_size - n_fg))
        return [int(i) for i in pick]

    def apply_corrections(idx: list[int], target: torch.Tensor, omega: torch.Tensor) -> None:
        """Overwrite targets with the user's painted labels at full weight."""
        if corr is None:
            return
        c = corr[idx].to(dev)
        mask = c >= 0
        target[mask] = c[mask]
        omega[mask] = 1.0

    def to_view(target: torch.Tensor, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Resample a batch's targets and weights onto the student's geometric view (if any).

        Pixels the view brings in from outside the slice are ignored (``pseudo.IGNORE``, weight 0).
        """
        if view_grid is None:
            return target, omega
        shifted = warp_labels(target + 1, view_grid)  # 0 only where the view samples outside the slice
        w = F.grid_sample(
            omega.unsqueeze(1), view_grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )[:, 0]
        return torch.where(shifted > 0, shifted - 1, pseudo.IGNORE), w * (shifted > 0)

    it = 0
    stopped = False
    t0 = time.perf_counter()
    for it in range(1, cfg.iterations + 1):
        ctl.wait_if_paused()
        if ctl.stopped:
            stopped = True
            it -= 1
            break
        idx = sample_batch()
        x = xs[idx].to(dev)
        x_s = x if cfg.augment == "none" else augment_intensity(x, aug_gen, *aug_probs)  # the student's view
        view_grid = random_affine_grid(x, aug_gen) if cfg.augment_geometry else None
        if view_grid is not None:
            x_s = warp_image(x_s, view_grid)
        _train_mode(student, cfg.bn)
        losses: dict[str, float] = {}

        # 1-3: predict, merge, confidence (pseudo labels come from the teacher when there is one)
        own_labels = reuse_own_forward and cfg.method in ("apl", "apl-con")
        if not own_labels:
            pm_t, pa_t = predict_probs(teacher if teacher is not None else student, x)

        if cfg.method in ("apl", "apl-con"):
            # 4: classifier step on L_Con with the encoder's features detached (E untouched).
            # The encoder's features are computed once: detached for this step, and reused with their
            # graph for the encoder step (E is not changed by the classifier step, so they are the same).
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                with torch.set_grad_enabled(cfg.method == "apl"):
                    feats = student.features(x_s)
                m_log, a_log = student.heads(tuple(f.detach() for f in feats), hw)
            p_m, p_a = torch.softmax(m_log.float(), 1), torch.softmax(a_log.float(), 1)
            if own_labels:  # the student's training forward is its inference forward: no second pass
                pm_t, pa_t = p_m.detach(), p_a.detach()
            merged_now = pseudo.merge(pm_t, pa_t)
            mean_dis = float(pseudo.consistency_map(pm_t, pa_t).mean())
            l_con = pseudo.loss_con(p_m, p_a, cfg.weight)
            opt_cls.zero_grad(set_to_none=True)
            l_con.backward()
            opt_cls.step()
            losses["con"] = float(l_con.detach())
            # 5: update the ensemble of pseudo labels
            changed = float(ensemble.update(idx, merged_now))
            ens = ensemble.get(idx, dev)
            omega = pseudo.confidence(ens)
            if cfg.class_norm > 0:
                if class_k is None or (it - 1) % cfg.guard_every == 0:
                    class_k = ensemble.class_thresholds(cfg.class_norm).to(dev)
                select = "all" if cfg.class_select else "background" if cfg.background_select else "none"
                target = pseudo.class_normalised_labels(ens, class_k, select)
            else:
                target = pseudo.class_argmax(ens)
            mean_conf = float(omega.mean())
            if cfg.method == "apl":
                # 6: encoder step on L_SSL; only the encoder's optimiser steps, and the backward pass
                # computes only the encoder's gradients (none for the classifiers' weights)
                apply_corrections(idx, target, omega)
                target, omega = to_view(target, omega)
                cw = None
                if cfg.class_balance:
                    if cfg.class_balance_volume:  # the whole ensemble's frequencies, for the batch's classes
                        if volume_cw is None or (it - 1) % cfg.guard_every == 0:
                            volume_cw = pseudo.class_balance_weights(ensemble.label, num_classes).to(dev)
                        present = _organ_counts(target, num_classes) > 0
                        # a class none of the ensemble's labels hold (painted by the user only) weighs as
                        # the rarest one, not 0: corrections count at full weight
                        seen_cw = torch.where(volume_cw > 0, volume_cw, volume_cw.max())
                        cw = torch.where(present, seen_cw, 0.0)
                    else:
                        cw = pseudo.class_balance_weights(target, num_classes)
                    cw = cw ** (2 * cfg.class_balance_power)
                    cw = (cw / cw[cw > 0].mean()).to(dev)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                    m_log, a_log = student.heads(feats, hw)
                l_ssl = pseudo.loss_ssl(m_log.float(), target, omega, cw)
                if cfg.both_heads_ssl:
                    l_ssl = 0.5 * (l_ssl + pseudo.loss_ssl(a_log.float(), target, omega, cw))
                opt_enc.zero_grad(set_to_none=True)
                opt_cls.zero_grad(set_to_none=True)
                l_ssl.backward(inputs=enc_params)
                opt_enc.step()
                losses["ssl"] = float(l_ssl.detach())
        else:
            merged_now = pseudo.merge(pm_t, pa_t)
            mean_dis = float(pseudo.consistency_map(pm_t, pa_t).mean())
            changed = float(ensemble.update(idx, merged_now))
            omega_all = pseudo.confidence(merged_now)
            mean_conf = float(omega_all.mean())
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                m_log, a_log = student(x_s)
            m_log, a_log = m_log.float(), a_log.float()
            ones = torch.ones_like(omega_all)
            if cfg.method == "threshold":
                target = pseudo.threshold_labels(merged_now, cfg.tau)
                apply_corrections(idx, target, ones)
                target, w = to_view(target, ones)
                loss = 0.5 * (pseudo.loss_ssl(m_log, target, w) + pseudo.loss_ssl(a_log, target, w))
            elif cfg.method == "cbst":
                rnd = min((it - 1) // round_len, cfg.rounds - 1)  # (the iterations left over: the last round)
                if cbst_k is None or (it - 1) == rnd * round_len:
                    portion = min(cfg.cbst_portion + cfg.cbst_step * rnd, cfg.cbst_max)
                    probs_all = []
                    for s in range(0, n_slices, 16):
                        a, b = predict_probs(teacher if teacher is not None else student, xs[s : s + 16])
                        probs_all.append(pseudo.merge(a, b).cpu())
                    cbst_k = pseudo.cbst_thresholds(torch.cat(probs_all), portion).to(dev)
                    losses["portion"] = portion
                target = pseudo.cbst_labels(merged_now, cbst_k)
                apply_corrections(idx, target, ones)
                target, w = to_view(target, ones)
                loss = 0.5 * (pseudo.loss_ssl(m_log, target, w) + pseudo.loss_ssl(a_log, target, w))
            else:  # mrnet: label from softmax(0.5 f_aux + f_main) of the teacher
                with torch.no_grad():
                    tm, ta = (student if teacher is None else fast_teacher() if teacher_fast else teacher)(x)
                    target = pseudo.class_argmax(torch.softmax(0.5 * ta.float() + tm.float(), 1))
                apply_corrections(idx, target, ones)
                target, w = to_view(target, ones)
                memory = pseudo.merge(torch.softmax(m_log, 1), torch.softmax(a_log, 1)).detach()
                loss, parts = pseudo.mrnet_loss(m_log, a_log, target, memory, cfg.mrnet_memory)
                losses.update(parts)
            opt_all.zero_grad(set_to_none=True)
            loss.backward()
            opt_all.step()
            losses["total"] = float(loss.detach())

        if teacher is not None:
            _ema_update(teacher, student, cfg.teacher_decay)

        # guard: finite losses and weights, and no organ collapsing to background in the returned model
        # (the weights of every guard_every-th iteration are checked, in that iteration or spread over
        # the next ones; the last iteration's are checked once after the loop). The weights' finiteness
        # is read at those iterations only: non-finite weights give a non-finite loss one iteration later.
        note = ""
        due = it % cfg.guard_every == 0 and it < cfg.iterations
        if not all(math.isfinite(v) for v in losses.values()) or (due and not _finite(student)):
            restore(good_state)
            note = f"non-finite loss or weights at iteration {it}: restored iteration {good_iter} and stopped"
            notes.append(note)
            stopped = True
        else:
            if check is not None:  # a check started earlier: go on (finish it when a new one is due)
                advance(check, len(guard_idx) if due else per_iteration)
                check, note = settle(check)
            if due and not stopped:  # (a finished check has made room for this iteration's)
                check, note = settle(begin_check(it))

        record = {
            "iteration": it,
            **losses,
            "mean_confidence": mean_conf,
            "mean_disagreement": mean_dis,
            "changed_fraction": changed,
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        emit = cfg.emit_every > 0 and (it % cfg.emit_every == 0)
        yield RefineEvent(
            iteration=it,
            total=cfg.iterations,
            losses=losses,
            mean_confidence=mean_conf,
            mean_disagreement=mean_dis,
            changed_fraction=changed,
            pseudo=_to_volume(prep, ensemble.labels()) if emit else None,
            note=note,
            labels=live.labels,
            checked=live.checked,
        )
        if stopped:
            break

    final = teacher if teacher is not None else student
    # Final check on the model actually returned: never hand back a broken or collapsed model.
    rebuilt = False
    if not _finite(final) or collapsed_organs(final):
        if check is not None:  # a check still under way may vouch for later weights than good_state
            advance(check, len(guard_idx))
            if not collapsed_in(check.counts):
                good_state, good_iter = check.state, check.iteration
        restore(good_state)
        rebuilt = True
        if not _finite(final) or collapsed_organs(final):
            final.load_state_dict(start_state)
            notes.append("the refined model lost an organ the start model found: returned the start model")
        else:
            notes.append(
                f"the refined model lost an organ: returned the checked state of iteration {good_iter}"
            )
    if rebuilt or any("restored" in n for n in notes):  # rebuild the pseudo labels from the returned model
        ensemble = _Ensemble(n_slices, num_classes, hw, cfg.ensemble_decay)
        for s in range(0, n_slices, 16):
            idx = list(range(s, min(s + 16, n_slices)))
            pm, pa = predict_probs(final, xs[idx])
            ensemble.update(idx, pseudo.merge(pm, pa))
    refined_counts = label_counts(final, range(n_slices))
    # The loaded model's organ sizes, to report how refinement changed them: a pass over the target made
    # here, after the iterations, not before them (the first live overlay comes that much sooner). The
    # student is spare once the teacher is returned; otherwise a copy takes the loaded weights.
    loaded = student if final is not student else copy.deepcopy(student)
    loaded.load_state_dict(start_state)
    loaded_counts = label_counts(loaded, range(n_slices))
    del loaded
    final = final.to("cpu", memory_format=torch.contiguous_format).eval()
    for p in final.parameters():
        p.requires_grad_(True)
    labels = ensemble.labels()
    if corr is not None:
        labels = torch.where(corr >= 0, corr.to(labels.dtype), labels)
    result = RefineResult(
        model=final,
        pseudo=_to_volume(prep, labels),
        history=history,
        stopped=stopped,
        iterations_done=it,
        notes=notes,
        organ_voxels={"start": loaded_counts.tolist(), "refined": refined_counts.tolist()},
    )
    return result
