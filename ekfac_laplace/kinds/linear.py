"""``nn.Linear``: ``y = W x + b`` on the last dimension of its input.

Every leading dimension but the batch is a position sharing the weight (a
sequence's tokens): ``a`` ``(B, S, d_in)`` and ``g`` ``(B, S, d_out)`` are the
input and the output gradient with those dimensions flattened. In a
sequence-first model the batch is found by the capture (not always dimension 0).
The bias shares the gradient factor ``G``. curvlinops supports it.
"""

from __future__ import annotations

from torch import nn

from ekfac_laplace.kinds.base import LayerKind


class Linear(LayerKind):
    """``nn.Linear`` (and its subclasses that keep its ``forward``)."""

    name = "linear"
    description = "an nn.Linear"
    batch_first = False
    routable = True
    base_classes = (nn.Linear,)

    def claims(
        self, model: nn.Module, module_name: str, module: nn.Module, param_name: str
    ) -> str | None:
        """Any ``nn.Linear``, under its own name."""
        return module_name if isinstance(module, nn.Linear) else None

    def curvlinops_supports(self, module: nn.Module) -> bool:
        """The KFAC of curvlinops handles ``nn.Linear``."""
        return True
