"""The pseudo-label maths of APL (Eq. 1-4 of the paper) and of the baselines it is compared with.

All functions take per-pixel class probabilities or logits as torch tensors shaped ``(N, C, H, W)``
(any number of trailing spatial dimensions works) and are differentiable where a loss needs them.

Conventions, stated once:

* The merged prediction is the mean of the two heads' probabilities, ``(p_m + p_a) / 2``; its
  argmax is the paper's ``argmax(D_m + D_a)`` and its values stay in [0, 1], so the confidence
  ``ω = top-1 − top-2`` (Eq. 3) is in [0, 1].
* The relevance matrix (Eq. 1) per pixel is ``R = W ⊙ (p_m p_aᵀ)``, a ``C × C`` matrix. The paper
  only says that W's entries are "the number of pixels". Two readings are offered:

  - ``"uniform"``: W = 1 everywhere. The off-diagonal mass of R is then ``1 − ⟨p_m, p_a⟩``, exactly
    BCDM's classifier discrepancy.
  - ``"confusion"``: ``W[i, j]`` = number of pixels in the batch that the main head assigns to
    class i and the auxiliary head to class j (the heads' hard confusion matrix), normalised so
    that its entries average 1 (``W = C² · n_ij / Σ n``). Pairs of classes that the heads really
    confuse weigh more; it carries no gradient.

* Losses are averaged over pixels rather than summed (the paper writes sums); this only rescales
  the learning rate and makes it independent of the slice size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

WeightMode = Literal["uniform", "confusion"]
IGNORE = 255


def merge(p_main: torch.Tensor, p_aux: torch.Tensor) -> torch.Tensor:
    """Return the merged prediction ``(p_m + p_a) / 2`` of the two heads."""
    return 0.5 * (p_main + p_aux)


def class_argmax(x: torch.Tensor) -> torch.Tensor:
    """Return ``torch.argmax(x, dim=1)`` (first maximum's index) via ``max``: same result, faster on CPU."""
    return torch.max(x, dim=1).indices


def pseudo_label(p_main: torch.Tensor, p_aux: torch.Tensor) -> torch.Tensor:
    """Return the pseudo label ``argmax(p_m + p_a)`` per pixel (int64, class axis removed)."""
    return class_argmax(p_main + p_aux)


def confidence(prob: torch.Tensor) -> torch.Tensor:
    """Return the category-aware confidence ω = top-1 − top-2 probability per pixel (Eq. 3).

    The two largest values are kept class by class with elementwise max/min: the same values as
    ``topk(k=2)`` (NaN included), without its sort, which dominates on CPU for a handful of classes.
    """
    if prob.shape[1] < 2:
        raise ValueError(f"confidence needs at least two classes, got {prob.shape[1]}")
    first = prob[:, 0]
    second = torch.full_like(first, float("-inf"))
    for c in range(1, prob.shape[1]):
        value = prob[:, c]
        second = torch.maximum(second, torch.minimum(first, value))
        first = torch.maximum(first, value)
    return (first - second).abs()


def confusion_weight(p_main: torch.Tensor, p_aux: torch.Tensor) -> torch.Tensor:
    """Return the heads' pixel-count confusion matrix, normalised to mean 1 (a ``C × C`` tensor)."""
    c = p_main.shape[1]
    a = class_argmax(p_main).reshape(-1)
    b = class_argmax(p_aux).reshape(-1)
    counts = torch.bincount(a * c + b, minlength=c * c).reshape(c, c).to(p_main.dtype)
    return counts * (c * c) / counts.sum().clamp_min(1)


def weight_matrix(
    p_main: torch.Tensor, p_aux: torch.Tensor, weight: WeightMode | torch.Tensor = "uniform"
) -> torch.Tensor:
    """Return the ``C × C`` weight matrix W of Eq. 1 for the chosen reading (or a given tensor)."""
    c = p_main.shape[1]
    if isinstance(weight, torch.Tensor):
        if weight.shape != (c, c):
            raise ValueError(f"weight matrix must be {c}x{c}, got {tuple(weight.shape)}")
        return weight.to(p_main)
    if weight == "uniform":
        return torch.ones(c, c, dtype=p_main.dtype, device=p_main.device)
    if weight == "confusion":
        return confusion_weight(p_main.detach(), p_aux.detach())
    raise ValueError(f"unknown weight mode '{weight}': choose uniform or confusion")


def relevance(
    p_main: torch.Tensor, p_aux: torch.Tensor, weight: WeightMode | torch.Tensor = "uniform"
) -> torch.Tensor:
    """Return the per-pixel relevance matrix ``R = W ⊙ p_m p_aᵀ`` shaped ``(N, C, C, *spatial)`` (Eq. 1)."""
    w = weight_matrix(p_main, p_aux, weight)
    outer = p_main.unsqueeze(2) * p_aux.unsqueeze(1)
    shape = (1, *w.shape) + (1,) * (p_main.dim() - 2)
    return outer * w.reshape(shape)


def disagreement(
    p_main: torch.Tensor, p_aux: torch.Tensor, weight: WeightMode | torch.Tensor = "uniform"
) -> torch.Tensor:
    """Return the per-pixel off-diagonal mass of R: how much the two heads disagree."""
    if isinstance(weight, str) and weight == "uniform":  # W = 1: Σ_{d≠c} p_a[d] is the sum minus p_a[c]
        mixed = p_aux.sum(dim=1, keepdim=True) - p_aux
    else:
        w = weight_matrix(p_main, p_aux, weight)
        off = w - torch.diag_embed(torch.diagonal(w))  # W without its diagonal
        # Σ_d W'[c, d] p_a[d] for every c: one (pixels x C) @ (C x C) product
        mixed = torch.matmul(p_aux.movedim(1, -1), off.t()).movedim(-1, 1)
    return (p_main * mixed).sum(dim=1)


def consistency_map(p_main: torch.Tensor, p_aux: torch.Tensor) -> torch.Tensor:
    """Return the displayable disagreement map ``1 − ⟨p_m, p_a⟩`` in [0, 1] (uniform W)."""
    return (1.0 - (p_main * p_aux).sum(dim=1)).clamp(0.0, 1.0)


def loss_con(
    p_main: torch.Tensor, p_aux: torch.Tensor, weight: WeightMode | torch.Tensor = "uniform"
) -> torch.Tensor:
    """Return L_Con (Eq. 2): the off-diagonal relevance mass averaged over pixels."""
    return disagreement(p_main, p_aux, weight).mean()


def loss_ssl(
    logits: torch.Tensor,
    target: torch.Tensor,
    omega: torch.Tensor,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE,
) -> torch.Tensor:
    """Return L_SSL (Eq. 4): the ω-weighted cross-entropy with the pseudo labels, averaged over pixels.

    ``class_weight`` optionally rescales classes (class balance); pixels labelled ``ignore_index``
    count neither in the sum nor in the average.
    """
    ce = F.cross_entropy(logits, target, weight=class_weight, ignore_index=ignore_index, reduction="none")
    valid = (target != ignore_index).to(ce.dtype)
    return (omega * ce * valid).sum() / valid.sum().clamp_min(1.0)


# --- baselines ------------------------------------------------------------------------------------


def threshold_labels(prob: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """Return argmax labels where the top probability exceeds τ, ``IGNORE`` elsewhere (Lee 2013)."""
    top, lab = prob.max(dim=1)
    return torch.where(top > tau, lab, torch.full_like(lab, IGNORE))


def cbst_thresholds(prob: torch.Tensor, portion: float) -> torch.Tensor:
    """Return CBST's per-class thresholds k_c: the top-``portion`` max-probability among pixels predicted c.

    Classes that no pixel is predicted as get k_c = 1 (nothing can pass it).
    """
    top, lab = prob.max(dim=1)
    return class_quantiles(top, lab, prob.shape[1], portion)


def class_quantiles(top: torch.Tensor, lab: torch.Tensor, num_classes: int, portion: float) -> torch.Tensor:
    """Return per class c the top-``portion`` value of ``top`` over the pixels ``lab`` puts in c.

    As CRST's ``kc_parameters``: of the n values sorted in descending order, the one at position
    ``floor(portion · n)`` counted from 1, so that exactly that many pixels reach it (ties aside); 1
    where that count is 0 (no pixel of the class, or fewer than 1 / portion). Read with ``kthvalue``,
    no full sort; ``top``/``lab`` are the max probability and its class.
    """
    k = torch.ones(num_classes, dtype=top.dtype, device=top.device)
    for cls in range(num_classes):
        vals = top[lab == cls]
        n = vals.numel()
        m = _selected_count(portion, n)
        if m:
            k[cls] = torch.kthvalue(vals, n - m + 1).values
    return k


def _selected_count(portion: float, n: int) -> int:
    """How many of a class's n pixels the top-``portion`` selects (CRST: ``floor(portion · n)``)."""
    return min(math.floor(portion * n), n)


def class_quantiles_f16(
    top: torch.Tensor, lab: torch.Tensor, num_classes: int, portion: float
) -> torch.Tensor:
    """``class_quantiles`` of float16 values ≥ 0 (as float32), read from one histogram of their bits.

    Non-negative float16 numbers sort as their 16-bit patterns, so one ``bincount`` over (class, bits)
    and a cumulative sum give every class's exact order statistic without selecting per class.
    """
    if top.dtype != torch.float16:
        raise ValueError(f"top must be float16, got {top.dtype}")
    bits = top.abs().contiguous().view(torch.int16).reshape(-1).long()  # abs: -0.0 is +0.0
    counts = torch.bincount(lab.reshape(-1).long() * 65536 + bits, minlength=num_classes * 65536)
    cum = counts.reshape(num_classes, 65536).cumsum(1)
    k = torch.ones(num_classes, dtype=torch.float32, device=top.device)
    for cls in range(num_classes):
        n = int(cum[cls, -1])
        m = _selected_count(portion, n)
        if not m:
            continue
        rank = n - m + 1  # as ``class_quantiles``: the m-th largest value
        pattern = int(torch.searchsorted(cum[cls], torch.tensor(rank, device=cum.device)))
        k[cls] = torch.tensor(pattern, dtype=torch.int16).view(torch.float16).float()
    return k


def cbst_labels(prob: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Return CBST's class-balanced labels ``argmax_c p_c / k_c``, ``IGNORE`` where the maximum is < 1."""
    return class_normalised_labels(prob, k, "all")


def class_normalised_labels(prob: torch.Tensor, k: torch.Tensor, select: str = "none") -> torch.Tensor:
    """Return APL's class-normalised pseudo labels ``argmax_c p_c / k_c``, optionally CBST-selected.

    ``select``: ``none`` keeps every pixel; ``all`` marks ``IGNORE`` where ``max_c p_c / k_c < 1`` (the
    pixels below their class's k_c: CBST's labels); ``background`` does so only where the label is
    background (class 0), so every organ pixel is kept. (k_c, a quantile of the top probability of
    the pixels in c or 1, is never below 1/C; the clamp only guards the division.)
    """
    if select not in ("none", "all", "background"):
        raise ValueError(f"select must be none, all or background, got {select!r}")
    scaled = prob / k.reshape(1, -1, *([1] * (prob.dim() - 2))).clamp_min(1e-3)
    top, lab = scaled.max(dim=1)
    if select == "none":
        return lab
    drop = top < 1.0
    if select == "background":
        drop &= lab == 0
    return torch.where(drop, torch.full_like(lab, IGNORE), lab)


def mrnet_loss(
    main_logits: torch.Tensor,
    aux_logits: torch.Tensor,
    target: torch.Tensor,
    memory: torch.Tensor | None = None,
    memory_weight: float = 0.1,
    ignore_index: int = IGNORE,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return MRNet's rectified loss: CE·exp(−var) + var with var = KL(p_aux ‖ p_main), plus a memory term.

    ``memory`` is the detached merged prediction the heads are pulled towards (weight 0.1).
    """
    log_main = F.log_softmax(main_logits, dim=1)
    log_aux = F.log_softmax(aux_logits, dim=1)
    var = (log_aux.exp() * (log_aux - log_main)).sum(dim=1)
    ce = F.cross_entropy(main_logits, target, ignore_index=ignore_index, reduction="none")
    valid = (target != ignore_index).to(ce.dtype)
    rect = (ce * torch.exp(-var) * valid).sum() / valid.sum().clamp_min(1.0) + var.mean()
    mem = torch.zeros((), dtype=rect.dtype, device=rect.device)
    if memory is not None and memory_weight > 0:
        mem_log = memory.clamp_min(1e-8).log()
        kl_main = (memory * (mem_log - log_main)).sum(dim=1).mean()
        kl_aux = (memory * (mem_log - log_aux)).sum(dim=1).mean()
        mem = memory_weight * (kl_main + kl_aux)
    total = rect + mem
    return total, {"rectified": float(rect.detach()), "memory": float(mem.detach())}


def class_balance_weights(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE) -> torch.Tensor:
    """Return class weights ∝ 1/√(frequency) of ``labels``, normalised to mean 1 over present classes."""
    lab = labels[labels != ignore_index].reshape(-1)
    counts = torch.bincount(lab, minlength=num_classes).to(torch.float32)
    w = torch.where(counts > 0, 1.0 / counts.clamp_min(1).sqrt(), torch.zeros_like(counts))
    present = counts > 0
    if present.any():
        w = w / w[present].mean()
    return w
