r"""The registry of module kinds with diagonal blocks: what each needs said about it.

Any module's parameters can have diagonal (or exact) blocks: their per-example
gradients are the vector-Jacobian products of the module alone
(:mod:`ekfac_laplace.diagonal`). A few kinds of module need more than that generic
path, and each says so in one class here, as the Kronecker layer kinds do in
:mod:`ekfac_laplace.kinds`:

* what makes a module unusable (:meth:`ModuleKind.check`: a batch norm in training
  mode, an embedding that renormalises itself);
* where the batch is in its inputs and outputs, if not dimension 0 of every tensor
  (:meth:`ModuleKind.convention`: recurrent layers' hidden states, attention's
  sequence-first default);
* a closed form for its per-example gradients (:meth:`ModuleKind.closed_form`: an
  embedding's scatter on the rows the batch uses, a norm layer's ``Σ g ⊙ x̂`` and
  ``Σ g``);
* whether ``vmap`` can replay it (:attr:`ModuleKind.vmappable`: the fused recurrent
  kernels have no batching rule).

A subclass with a ``name`` registers itself; :func:`module_kind` gives the first kind
(highest ``priority``) that claims a module, :class:`AnyModule` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ekfac_laplace.errors import UnsplittableCallError

#: Batch dimensions ``(args, kwargs, output leaves)`` of a call (``None``: shared).
Dims = tuple[Any, Any, tuple[int | None, ...]]

_REGISTRY: list[ModuleKind] = []


class ModuleKind:
    """One kind of module with diagonal blocks (subclass it to add one).

    Attributes:
        name: Short name, saved in the fitted layout.
        priority: Against a more general kind claiming the same module (higher
            first).
        vmappable: Whether ``torch.func.vmap`` can replay the module's forward.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    vmappable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:  # concrete kinds register one instance
            _REGISTRY.append(cls())
            _REGISTRY.sort(key=lambda kind: -kind.priority)

    def __repr__(self) -> str:
        return f"<module kind {self.name}>"

    def claims(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this kind."""
        raise NotImplementedError

    def check(self, name: str, module: nn.Module) -> None:
        """Refuse a module of this kind whose per-example curvature is undefined.

        Args:
            name: The module's name, for the message.
            module: The module.
        """

    def convention(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        leaves: list[Any],
    ) -> Dims | None:
        """Where the batch is in a call's tensors, or ``None`` for the default.

        Args:
            name: The module's name, for messages.
            module: The module.
            args: The call's positional inputs.
            kwargs: Its keyword inputs.
            leaves: Its output's leaves (``torch.utils._pytree`` order).

        Returns:
            The batch dimension of every input and output leaf, or ``None``.
        """
        return None

    def closed_form(
        self,
        module: nn.Module,
        names: Sequence[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        grad_output: Tensor,
        memo: dict[str, Any],
    ) -> list[tuple[Tensor | None, Tensor]] | None:
        """Per-example gradients in closed form, or ``None`` for the generic path.

        Called only for one batch-first output tensor and plain parameters
        (``weight``, ``bias``) without pre-hooks.

        Args:
            module: The module.
            names: Its parameters to differentiate.
            args: The call's positional inputs.
            kwargs: Its keyword inputs.
            grad_output: The gradient at its output.
            memo: Per call, for what every backward pass of the call shares.

        Returns:
            Per name ``(rows, gradients)`` as
            :func:`~ekfac_laplace.diagonal.restricted_gradients`, or ``None``.
        """
        return None


def module_kind(module: nn.Module) -> ModuleKind:
    """The registered kind of a module with diagonal blocks.

    Args:
        module: The module.

    Returns:
        The first kind (by priority) that claims it.
    """
    return next(kind for kind in _REGISTRY if kind.claims(module))


def _tensors_at(dim: int) -> Any:
    return lambda value: dim if isinstance(value, Tensor) else None


def _rows_of(tensor: Tensor, grad_output: Tensor) -> Tensor:
    """A one-row input shared by the batch, expanded to the gradient's rows."""
    if tensor.shape[0] == 1 and grad_output.shape[0] > 1:
        return tensor.expand(grad_output.shape[0], *tensor.shape[1:])
    return tensor


def _one_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
        return None
    return args[0]


class AnyModule(ModuleKind):
    """Any module: per-example gradients by ``vmap`` of the module's ``vjp``."""

    name = "module"
    priority = -100

    def claims(self, module: nn.Module) -> bool:  # noqa: D102
        return True


class Embedding(ModuleKind):
    """``nn.Embedding``: a scatter of the output gradient on the rows the batch uses.

    ``scale_grad_by_freq`` rescales autograd's gradient, not the Jacobian, so the
    closed form holds for it too; ``max_norm`` is refused.
    """

    name = "embedding"

    def claims(self, module: nn.Module) -> bool:  # noqa: D102
        return isinstance(module, nn.Embedding)

    def check(self, name: str, module: nn.Module) -> None:  # noqa: D102
        if module.max_norm is not None:
            raise ValueError(
                f"Embedding '{name}' has max_norm={module.max_norm}: it renormalises "
                "its weights in place during every forward pass, so there is no "
                "fixed MAP to linearise around. Use max_norm=None, or freeze it with "
                "requires_grad_(False)."
            )

    def closed_form(  # noqa: D102
        self,
        module: nn.Module,
        names: Sequence[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        grad_output: Tensor,
        memo: dict[str, Any],
    ) -> list[tuple[Tensor | None, Tensor]] | None:
        indices = _one_tensor(args, kwargs)
        if (
            type(module) is not nn.Embedding  # a subclass may look up otherwise
            or list(names) != ["weight"]
            or indices is None
            or indices.is_floating_point()
        ):
            return None
        indices = _rows_of(indices, grad_output)
        batch = indices.shape[0]
        tokens = indices.reshape(batch, -1)
        if "embedding_rows" not in memo:
            memo["embedding_rows"] = torch.unique(tokens, return_inverse=True)
        rows, position = memo["embedding_rows"]
        grads = grad_output.reshape(batch, tokens.shape[1], -1)
        if module.padding_idx is not None:  # the padding row receives no gradient
            grads = grads * (tokens != module.padding_idx).unsqueeze(-1)
        summed = grads.new_zeros(batch, len(rows), grads.shape[-1])
        summed.scatter_add_(1, position.unsqueeze(-1).expand_as(grads), grads)
        return [(rows, summed)]


def _affine(
    names: Sequence[str], g: Tensor, x: Tensor
) -> list[tuple[Tensor | None, Tensor]]:
    """``∂/∂γ = Σ g ⊙ x̂`` and ``∂/∂β = Σ g`` over the positions (dimension 1)."""
    per_name = {"weight": lambda: (g * x).sum(1), "bias": lambda: g.sum(1)}
    return [(None, per_name[name]()) for name in names]


class BatchNorm(ModuleKind):
    """Batch norms with running statistics, in eval mode: ``y = γ ⊙ x̂ + β``."""

    name = "batch_norm"
    classes: ClassVar[tuple[type[nn.Module], ...]] = (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
    )

    def claims(self, module: nn.Module) -> bool:  # noqa: D102
        return isinstance(module, self.classes)

    def check(self, name: str, module: nn.Module) -> None:  # noqa: D102
        if module.training:
            raise ValueError(
                f"{type(module).__name__} '{name}' is in training mode, where its "
                "output depends on the whole batch; call model.eval() before "
                "fitting (laplace-torch's fit does)."
            )
        if module.running_mean is None:
            raise ValueError(
                f"{type(module).__name__} '{name}' has track_running_stats=False, so "
                "even in eval mode its output depends on the whole batch; "
                "per-example curvature is not defined. Track running statistics, or "
                "freeze it with requires_grad_(False)."
            )

    def closed_form(  # noqa: D102
        self,
        module: nn.Module,
        names: Sequence[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        grad_output: Tensor,
        memo: dict[str, Any],
    ) -> list[tuple[Tensor | None, Tensor]] | None:
        x = _one_tensor(args, kwargs)
        if type(module) not in self.classes[:3] or x is None:
            return None
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = module.running_mean.reshape(shape)
        var = module.running_var.reshape(shape)
        x = _rows_of((x - mean) / torch.sqrt(var + module.eps), grad_output)
        batch, channels = grad_output.shape[:2]  # channels in dimension 1
        g = grad_output.reshape(batch, channels, -1).transpose(1, 2)
        return _affine(names, g, x.reshape(batch, channels, -1).transpose(1, 2))


class LayerNorm(ModuleKind):
    """``nn.LayerNorm``: ``y = γ ⊙ x̂ + β`` over its normalised dimensions."""

    name = "layer_norm"

    def claims(self, module: nn.Module) -> bool:  # noqa: D102
        return isinstance(module, nn.LayerNorm)

    def closed_form(  # noqa: D102
        self,
        module: nn.Module,
        names: Sequence[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        grad_output: Tensor,
        memo: dict[str, Any],
    ) -> list[tuple[Tensor | None, Tensor]] | None:
        x = _one_tensor(args, kwargs)
        if type(module) is not nn.LayerNorm or x is None:
            return None
        dims = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        x = _rows_of((x - mean) / torch.sqrt(var + module.eps), grad_output)
        flat = (grad_output.shape[0], -1, *module.normalized_shape)
        return _affine(names, grad_output.reshape(flat), x.reshape(flat))


class Recurrent(ModuleKind):
    """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``: batch in dimension 1 of the states.

    Replayed one example at a time: the fused kernels have no batching rule.
    """

    name = "recurrent"
    vmappable = False

    def claims(self, module: nn.Module) -> bool:  # noqa: D102
        return isinstance(module, nn.RNNBase)

    def convention(  # noqa: D102
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        leaves: list[Any],
    ) -> Dims | None:
        if not isinstance(args[0], Tensor):
            raise UnsplittableCallError(
                name, module, "takes a PackedSequence, which mixes the examples"
            )
        if args[0].ndim != 3:
            raise UnsplittableCallError(name, module, "takes an unbatched sequence")
        batch = 0 if module.batch_first else 1
        arg_dims = (batch, *tree_map(_tensors_at(1), args[1:]))  # hx: dimension 1
        kwarg_dims = tree_map(_tensors_at(1), kwargs)
        output_dims = tuple(  # (output, h) or (output, (h, c))
            (batch if i == 0 else 1) if isinstance(leaf, Tensor) else None
            for i, leaf in enumerate(leaves)
        )
        return arg_dims, kwarg_dims, output_dims


_ATTENTION_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


class Attention(ModuleKind):
    """``nn.MultiheadAttention`` (its parameters other than the projections)."""

    name = "attention"

    def claims(self, module: nn.Module) -> bool:  # noqa: D102
        return isinstance(module, nn.MultiheadAttention)

    def convention(  # noqa: D102
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        leaves: list[Any],
    ) -> Dims | None:
        batch = 0 if module.batch_first else 1
        named = dict(zip(_ATTENTION_ARGS, args)) | kwargs
        if named["query"].ndim != 3:
            raise UnsplittableCallError(name, module, "takes an unbatched sequence")
        mask = named.get("attn_mask")
        if isinstance(mask, Tensor) and mask.ndim == 3:
            raise UnsplittableCallError(
                name, module, "takes a 3-D attn_mask, with examples and heads mixed"
            )

        def dim(key: str, value: Any) -> int | None:
            if not isinstance(value, Tensor):
                return None
            if key in ("query", "key", "value"):
                return batch
            return 0 if key == "key_padding_mask" else None

        arg_dims = tuple(dim(key, value) for key, value in zip(_ATTENTION_ARGS, args))
        kwarg_dims = {key: dim(key, value) for key, value in kwargs.items()}
        output_dims = tuple(  # (output, weights): the weights are batch-first
            (batch if i == 0 else 0) if isinstance(leaf, Tensor) else None
            for i, leaf in enumerate(leaves)
        )
        return arg_dims, kwarg_dims, output_dims
