"""The dual-head network contract shared by every architecture.

A dual-head network is a shared encoder ``E`` (everything the two classifiers have in common)
followed by a main classifier ``D_m`` and an auxiliary classifier ``D_a`` that look at different
encoder features. APL needs the split: pseudo labels come from the agreement of the two heads,
and the encoder and the classifiers are optimised with different losses.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class DualHeadNet(nn.Module):
    """Base class of the dual-head segmentation networks: ``forward(x) -> (main, aux)`` logits.

    Subclasses set ``arch`` (the registry name), ``stride`` (input height and width must be
    multiples of it), ``classifier_modules`` (names of the top-level child modules that form
    ``D_m`` and ``D_a``; every other parameter belongs to the encoder), ``main_head_key`` (the
    state-dict key of the main classifier weight whose first dimension is the class count),
    ``logit_prefixes`` (state-dict key prefixes of the tensors whose first dimension is the logits'
    class axis, in both heads: reordering them along it reorders the classes) and ``arch_args``
    (JSON-friendly keyword arguments such that ``build_model(arch, **arch_args)`` rebuilds the same
    network). They implement ``features`` and ``heads``.
    """

    arch: str = ""
    stride: int = 1
    classifier_modules: tuple[str, ...] = ()
    main_head_key: str = ""
    logit_prefixes: tuple[str, ...] = ()

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.arch_args: dict[str, Any] = {"num_classes": num_classes, "in_channels": in_channels}

    # -- the network -------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the shared encoder ``E`` and return the features both classifiers read."""
        raise NotImplementedError

    def heads(
        self, feats: tuple[torch.Tensor, ...], out_hw: tuple[int, int] | torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``D_m`` and ``D_a`` on encoder features; return logits resized to ``out_hw``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(main_logits, aux_logits)``, both ``(N, C, H, W)`` at the input resolution."""
        return self.heads(self.features(x), tuple(x.shape[-2:]))

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """Return ``(conv, batch_norm)`` module names where the batch norm reads only that convolution.

        Such a batch norm can be folded into its convolution for inference (``models.fold``). This
        default finds a ``Conv2d`` directly followed by a ``BatchNorm2d`` inside an ``nn.Sequential``
        (whose output feeds only the next module); architectures that call their layers by hand
        declare theirs.
        """
        pairs = []
        for name, mod in self.named_modules():
            if not isinstance(mod, nn.Sequential):
                continue
            kids = list(mod.named_children())
            for (a_name, a), (b_name, b) in itertools.pairwise(kids):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a_name, prefix + b_name))
        return pairs

    def _check_input(self, x: torch.Tensor, *, multiple: bool = True) -> None:
        """Raise a ValueError when ``x`` is not an ``(N, in_channels, H, W)`` batch of a valid size."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch} expects a batch of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if multiple and (h % self.stride or w % self.stride):
            raise ValueError(
                f"{self.arch} input size {h}x{w} is not a multiple of its stride {self.stride}: pad it"
            )

    # -- parameter groups ---------------------------------------------------------------------
    def _is_classifier(self, name: str) -> bool:
        """Return whether the parameter or buffer ``name`` belongs to a classifier head."""
        return name.split(".", 1)[0] in self.classifier_modules

    def encoder_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Iterate ``(name, parameter)`` of the shared encoder ``E``."""
        for name, p in self.named_parameters():
            if not self._is_classifier(name):
                yield name, p

    def classifier_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Iterate ``(name, parameter)`` of both classifiers ``D_m`` and ``D_a``."""
        for name, p in self.named_parameters():
            if self._is_classifier(name):
                yield name, p

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Iterate the parameters of the shared encoder ``E``."""
        for _, p in self.encoder_named_parameters():
            yield p

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """Iterate the parameters of both classifiers (disjoint from ``encoder_parameters``)."""
        for _, p in self.classifier_named_parameters():
            yield p

    def encoder_modules(self) -> list[nn.Module]:
        """Return the top-level child modules that make up the encoder."""
        return [m for n, m in self.named_children() if n not in self.classifier_modules]

    def classifier_heads(self) -> list[nn.Module]:
        """Return the top-level child modules that make up the classifiers."""
        return [m for n, m in self.named_children() if n in self.classifier_modules]

    def parameter_counts(self) -> dict[str, int]:
        """Return the number of parameters of the encoder, the classifiers and in total."""
        enc = sum(p.numel() for p in self.encoder_parameters())
        cls = sum(p.numel() for p in self.classifier_parameters())
        return {"encoder": enc, "classifiers": cls, "total": enc + cls}
