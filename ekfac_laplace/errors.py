"""The errors of capturing a model's modules (the fit, the predictive, the check)."""

from __future__ import annotations

from torch import nn


class CaptureError(ValueError):
    """A module of the layout cannot be captured (see the subclasses)."""


class UnsplittableCallError(CaptureError):
    """A module with a diagonal block whose examples cannot be told apart."""

    def __init__(self, name: str, module: nn.Module, reason: str) -> None:
        super().__init__(
            f"Module '{name}' ({type(module).__name__}) {reason}, so its per-example "
            "gradients are not defined; diagonal blocks need the batch in a known "
            "dimension of its inputs and outputs. Freeze its parameters with "
            "requires_grad_(False), or call it on batched tensors with the batch "
            "in dimension 0."
        )
