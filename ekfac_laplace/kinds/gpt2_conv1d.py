"""GPT-2's ``Conv1D`` (Hugging Face ``transformers``): ``y = x W + b``.

A ``Linear`` that stores its weight transposed, ``(d_in, d_out)``: the same ``a``
and ``g`` as :class:`~ekfac_laplace.kinds.linear.Linear`, the weight seen as
``Wᵀ``, and the block's eigenbasis ``Q_A ⊗ Q_G`` in the weight's own order.
Recognised by duck typing, so that ``transformers`` is not needed. curvlinops does
not support it.
"""

from __future__ import annotations

from torch import Tensor, nn

from ekfac_laplace.kinds.base import LayerKind


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is GPT-2's ``Conv1D``: ``x @ W + b`` with ``W (d_in, d_out)``.

    The class is named ``Conv1D`` and has ``nf`` outputs and a 2-D weight
    ``(d_in, nf)``.

    Args:
        module: Any module.

    Returns:
        ``True`` for a GPT-2 ``Conv1D``.
    """
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, Tensor)
        and weight.ndim == 2
        and weight.shape[1] == module.nf
    )


class GPT2Conv1D(LayerKind):
    """GPT-2's ``Conv1D``, a ``Linear`` with its weight stored ``(d_in, d_out)``."""

    name = "gpt2_conv1d"
    description = "a GPT-2 Conv1D"
    transposed = True
    batch_first = False
    routable = True

    def claims(
        self, model: nn.Module, module_name: str, module: nn.Module, param_name: str
    ) -> str | None:
        """A GPT-2 ``Conv1D``, under its own name."""
        return module_name if is_transposed_linear(module) else None

    def as_matrix(self, weight_like: Tensor) -> Tensor:
        """``Wᵀ``: the stored ``(d_in, d_out)`` weight transposed."""
        return weight_like.T
