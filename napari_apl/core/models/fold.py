"""Inference copies of a network with each batch norm folded into the convolution that feeds it.

In eval mode a batch norm is a per-channel affine map ``y = s·x + t`` with ``s = γ / √(var + ε)`` and
``t = β − mean·s``. When it reads a convolution's output and nothing else does, the convolution can
absorb it: ``W' = s·W`` and ``b' = s·b + t``. The folded network computes the same function (to float
rounding) and skips one full pass over every activation per batch norm. The refinement's no-grad
forwards (the EMA teacher's pseudo labels, the collapse guard) run on such a copy, refreshed from the
teacher's current weights before each use; the trained model itself is never changed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from .base import DualHeadNet


def _get(root: nn.Module, name: str) -> nn.Module:
    """Return the submodule ``name`` (dotted path) of ``root``."""
    return root.get_submodule(name) if name else root


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted path) of ``root`` with ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(_get(root, parent), child, module)


def foldable_pairs(model: DualHeadNet) -> list[tuple[str, str]]:
    """Return the ``(conv, batch_norm)`` module names of ``model`` whose batch norm can be folded.

    A pair is one the architecture declares (``DualHeadNet.conv_bn_pairs``) whose convolution is a plain
    ``Conv2d`` (no padding mode other than zeros) and whose batch norm keeps running statistics (one
    without them normalises with the batch's own statistics even in eval mode, which no weight can express).
    """
    pairs = []
    for conv_name, bn_name in model.conv_bn_pairs():
        conv, bn = _get(model, conv_name), _get(model, bn_name)
        if (
            type(conv) is nn.Conv2d
            and conv.padding_mode == "zeros"
            and isinstance(bn, nn.BatchNorm2d)
            and bn.track_running_stats
            and bn.running_mean is not None
            and bn.num_features == conv.out_channels
        ):
            pairs.append((conv_name, bn_name))
    return pairs


class FoldedNet(nn.Module):
    """An eval-mode copy of a dual-head network with its foldable batch norms folded in.

    ``refresh(state)`` loads the weights of a ``state_dict`` of the original network (with its batch
    norms): the folded convolutions get ``s·W`` and ``s·b + t``, everything else is copied. Calling the
    copy returns ``(main, aux)`` logits like the original's ``forward`` in eval mode.
    """

    def __init__(self, model: DualHeadNet) -> None:
        super().__init__()
        self.pairs = foldable_pairs(model)
        net = copy.deepcopy(model).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self._folded: list[tuple[str, str, nn.Conv2d, float]] = []
        for conv_name, bn_name in self.pairs:
            conv = _get(net, conv_name)
            eps = float(_get(net, bn_name).eps)
            assert isinstance(conv, nn.Conv2d)
            if conv.bias is None:
                w = conv.weight
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=w.dtype, device=w.device))
                conv.bias.requires_grad_(False)
            _set(net, bn_name, nn.Identity())
            self._folded.append((conv_name, bn_name, conv, eps))
        self.net = net
        folded = {f"{c}.{k}" for c, *_ in self._folded for k in ("weight", "bias")}
        # every other parameter and buffer, copied by name on refresh
        self._copied = [
            (name, t) for name, t in (*net.named_parameters(), *net.named_buffers()) if name not in folded
        ]
        self.refresh(model.state_dict())
        self.eval()

    @torch.no_grad()
    def refresh(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the original network's ``state`` (its ``state_dict``, batch norms included)."""
        for conv_name, bn_name, conv, eps in self._folded:
            var = state[f"{bn_name}.running_var"]
            gamma = state.get(f"{bn_name}.weight")
            scale = torch.rsqrt(var.float() + eps)
            if gamma is not None:
                scale = scale * gamma.float()
            shift = -state[f"{bn_name}.running_mean"].float() * scale
            beta = state.get(f"{bn_name}.bias")
            if beta is not None:
                shift = shift + beta.float()
            bias = state.get(f"{conv_name}.bias")
            if bias is not None:
                shift = shift + bias.float() * scale
            w = state[f"{conv_name}.weight"]
            conv.weight.copy_(w * scale.to(w.dtype).reshape(-1, 1, 1, 1))
            conv.bias.copy_(shift)
        if self._copied:
            torch._foreach_copy_([t for _, t in self._copied], [state[name] for name, _ in self._copied])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(main_logits, aux_logits)`` of the folded copy (eval mode)."""
        return self.net(x)
