"""``nn.MultiheadAttention``'s packed in-projection and its out-projection.

The attention applies both with ``F.linear`` inside its own forward, on
sequence-first tensors: the capture sees those calls
(:func:`~ekfac_laplace._compat.watching_functional_linear`). The in-projection's
calls (self-attention: one; cross-attention: the query rows, then the key and value
rows of ``in_proj_weight``) become positions of one layer: their inputs
concatenated, each output gradient placed in the rows of the weight it used, so that
``Σ_s g_s a_sᵀ`` is the weight's gradient. The attention's other parameters
(``bias_k``, ``bias_v``, separate q/k/v weights) get diagonal blocks. Neither
projection can fall back to a diagonal block of its own (the attention applies it
functionally); curvlinops supports neither.
"""

from __future__ import annotations

from torch import nn

from ekfac_laplace.kinds.base import LayerKind


class AttentionInProjection(LayerKind):
    """``in_proj_weight`` / ``in_proj_bias`` of an ``nn.MultiheadAttention``."""

    name = "attention_in"
    description = "the in-projection of an nn.MultiheadAttention"
    priority = 10
    weight_name = "in_proj_weight"
    bias_name = "in_proj_bias"
    applied_by_parent = True
    other_parameters_diagonal = True

    def claims(
        self, model: nn.Module, module_name: str, module: nn.Module, param_name: str
    ) -> str | None:
        """The packed projection (q, k, v of one width) as ``"<name>.in_proj"``."""
        if (
            isinstance(module, nn.MultiheadAttention)
            and module.in_proj_weight is not None
            and param_name in (self.weight_name, self.bias_name)
        ):
            return f"{module_name}.in_proj" if module_name else "in_proj"
        return None

    def attention_of(
        self, model: nn.Module, module_name: str, module: nn.Module
    ) -> nn.MultiheadAttention | None:
        """The attention itself."""
        return module


class AttentionOutProjection(LayerKind):
    """``out_proj`` of an ``nn.MultiheadAttention`` (applied with ``F.linear``)."""

    name = "attention_out"
    description = "the out-projection of an nn.MultiheadAttention"
    priority = 10
    applied_by_parent = True

    def claims(
        self, model: nn.Module, module_name: str, module: nn.Module, param_name: str
    ) -> str | None:
        """A ``Linear`` named ``out_proj`` inside an attention."""
        if isinstance(module, nn.Linear) and self._parent(model, module_name):
            return module_name
        return None

    def attention_of(
        self, model: nn.Module, module_name: str, module: nn.Module
    ) -> nn.MultiheadAttention | None:
        """The attention that applies it."""
        return self._parent(model, module_name)

    @staticmethod
    def _parent(model: nn.Module, module_name: str) -> nn.MultiheadAttention | None:
        parent_name, _, child = module_name.rpartition(".")
        if child != "out_proj":
            return None
        parent = model.get_submodule(parent_name)
        return parent if isinstance(parent, nn.MultiheadAttention) else None
