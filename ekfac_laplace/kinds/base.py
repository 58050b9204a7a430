r"""What a kind of Kronecker-factored layer declares, and the registry of kinds.

A layer of a Kronecker kind applies a weight matrix ``W`` (``d_out × d_in``) to
input vectors at positions ``s`` that share it (a convolution's patches, a
sequence's tokens), so that its weight gradient for one example is a sum of outer
products and KFAC factorises its curvature:

$$
    \nabla_W \ell_n = \sum_s g_{n,s}\, a_{n,s}^\top ,
    \qquad A = \sum_{n,s} a_{n,s} a_{n,s}^\top ,
    \quad G = \sum_{n,s} g_{n,s} g_{n,s}^\top .
$$

Each kind says how its module's input and output gradient become the common
``a`` ``(B, S, d_in)`` and ``g`` ``(B, S, d_out)`` (:meth:`LayerKind.inputs`,
:meth:`LayerKind.output_gradients`), how the parameter is laid out as ``W``
(:meth:`LayerKind.as_matrix`; a transposed layout makes the block's eigenbasis
``Q_A ⊗ Q_G``), where its bias's gradient comes from, whether curvlinops supports
it, and which modules it claims. Everything else — the engine, the accumulators,
the Jacobian-free predictive, the layer check, the state — works on ``a`` and ``g``
alone, so a new kind is one subclass in one file; subclasses register themselves
(as kronfluence's tracked modules do).

``kfac_approx`` means the same for every kind: ``"expand"`` takes each position as
an example in ``A`` and ``G``; ``"reduce"`` averages the inputs and sums the output
gradients over the positions first (Eschenhagen et al., 2023). The corrected
eigenvalues use the exact per-example gradients either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor, nn


class LayerKind:
    """One kind of Kronecker-factored layer (subclass it to add one).

    A subclass sets the class attributes and implements :meth:`claims`,
    :meth:`inputs` and, where they differ from a ``Linear``'s, the other methods;
    defining it registers it (:func:`registered_kinds`).

    Attributes:
        name: Short name, for messages and tests.
        description: What it is, for messages (``"an nn.Linear"``).
        priority: Kinds are asked in decreasing priority (a more specific kind —
            an attention's out-projection — before the general one, ``Linear``).
        weight_name: The weight's name in the module.
        bias_name: The bias's name in the module.
        transposed: Whether the weight is stored so that row-major order runs
            over ``d_in`` first (GPT-2's ``Conv1D``, transposed convolutions): the
            block's eigenbasis is then ``Q_A ⊗ Q_G``.
        separate_bias: Whether the bias's gradient is not the sum of ``g`` over
            the positions (transposed convolutions, whose ``g`` is a patch of the
            output gradient): the bias then gets its own factor from
            :meth:`bias_gradients`.
        applied_by_parent: Whether the module's parent applies it functionally
            inside its own forward (``nn.MultiheadAttention``'s projections): the
            capture sees it through ``F.linear``, and it cannot have a diagonal
            block of its own.
        batch_first: Whether the batch is always dimension 0 of the module's
            tensors (else, as for ``Linear`` in a sequence-first transformer,
            the capture finds it).
        base_classes: The classes whose ``forward`` the kind assumes (a subclass
            that overrides it is named by the layer check; an instance the kind
            cannot factorise is named by :func:`unsupported_reason`).
        other_parameters_diagonal: Whether the module may hold parameters the
            kind does not apply, which get diagonal blocks (an attention's
            ``bias_k``); otherwise such a module gets diagonal blocks throughout.
        routable: Whether the module may be called on some of the examples' rows
            only, as ``(rows, d_in)`` (a mixture-of-experts expert): the capture
            then finds each row's example (or a call on none) and lays the rows
            out per example.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    weight_name: ClassVar[str] = "weight"
    bias_name: ClassVar[str] = "bias"
    transposed: ClassVar[bool] = False
    separate_bias: ClassVar[bool] = False
    applied_by_parent: ClassVar[bool] = False
    batch_first: ClassVar[bool] = True
    base_classes: ClassVar[tuple[type[nn.Module], ...]] = ()
    other_parameters_diagonal: ClassVar[bool] = False
    routable: ClassVar[bool] = False

    _registry: ClassVar[list[LayerKind]] = []

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:  # concrete kinds register one instance
            LayerKind._registry.append(cls())
            LayerKind._registry.sort(key=lambda kind: -kind.priority)

    def __repr__(self) -> str:
        return f"<layer kind {self.name}>"

    # ------------------------------------------------------------- which modules
    def claims(
        self, model: nn.Module, module_name: str, module: nn.Module, param_name: str
    ) -> str | None:
        """The layer's name if this kind applies ``module``'s ``param_name``.

        Args:
            model: The network (for the module's parent).
            module_name: The module's name in the model.
            module: The module.
            param_name: A parameter of it in the posterior.

        Returns:
            The layer's name (the module's, or e.g. ``"<attention>.in_proj"``),
            or ``None``.
        """
        raise NotImplementedError

    def assumed_class(self, module: nn.Module) -> type[nn.Module] | None:
        """The class of :attr:`base_classes` whose ``forward`` ``module`` should run.

        Args:
            module: A module this kind claims.

        Returns:
            The class, or ``None``.
        """
        return next((c for c in self.base_classes if isinstance(module, c)), None)

    def unsupported(self, module: nn.Module) -> str | None:
        """Why a module this kind claims cannot have Kronecker blocks (or ``None``).

        Such a module gets diagonal blocks like any other module, without a
        warning (``groups > 1``, say).

        Args:
            module: The module.

        Returns:
            The reason, or ``None``.
        """
        return None

    def attention_of(
        self, model: nn.Module, module_name: str, module: nn.Module
    ) -> nn.MultiheadAttention | None:
        """For :attr:`applied_by_parent` kinds: the module that applies it.

        Args:
            model: The network.
            module_name: The module's name.
            module: The module.

        Returns:
            The ``nn.MultiheadAttention``, or ``None``.
        """
        return None

    def curvlinops_supports(self, module: nn.Module) -> bool:
        """Whether ``engine="curvlinops"`` computes this layer's factors correctly.

        Args:
            module: The module.

        Returns:
            ``False`` unless the kind says otherwise.
        """
        return False

    # ----------------------------------------------------------- what it sees
    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """The layer's input as ``a``, shape ``(B, S, d_in)``.

        Args:
            module: The module.
            x: What its ``forward`` received (batch in dimension 0).

        Returns:
            One row per example and position.
        """
        return as_rows(x)

    def output_gradients(self, module: nn.Module, gradient: Tensor) -> Tensor:
        """The gradient at the layer's output as ``g``, shape ``(B, S, d_out)``.

        Args:
            module: The module.
            gradient: Shaped like the module's output (batch in dimension 0).

        Returns:
            One row per example and position, matching :meth:`inputs`.
        """
        return as_rows(gradient)

    def bias_gradients(self, module: nn.Module, gradient: Tensor) -> Tensor:
        """The rows whose sum over positions is an example's bias gradient.

        Args:
            module: The module.
            gradient: Shaped like the module's output.

        Returns:
            ``(B, S_b, d_b)``; by default :meth:`output_gradients`.
        """
        return self.output_gradients(module, gradient)

    # ------------------------------------------------------------ its weight
    def as_matrix(self, weight_like: Tensor) -> Tensor:
        """The weight (or a tensor shaped like it) as the ``(d_out, d_in)`` map.

        Args:
            weight_like: Shaped like the weight.

        Returns:
            Shape ``(d_out, d_in)``; ``G`` acts on its rows, ``A`` on its columns.
        """
        return weight_like.reshape(weight_like.shape[0], -1)

    def groups(self, module: nn.Module) -> int:
        """The number of independent groups of the weight (grouped convolutions).

        A grouped layer's ``a`` and ``g`` hold the groups side by side
        (``G·d_in``, ``G·d_out``, each group's contiguous), and each group gets its
        own Kronecker factors: the block is ``⊕_g Q_G^g ⊗ Q_A^g``.

        Args:
            module: The module.

        Returns:
            ``G`` (``1`` by default).
        """
        return 1

    def as_groups(self, weight_like: Tensor, groups: int) -> Tensor:
        """The weight (or a tensor shaped like it) as ``G`` maps ``(d_out, d_in)``.

        Args:
            weight_like: Shaped like the weight.
            groups: ``G``.

        Returns:
            Shape ``(G, d_out, d_in)``; for ``G = 1`` :meth:`as_matrix` of it.
        """
        if groups == 1:
            return self.as_matrix(weight_like).unsqueeze(0)
        return weight_like.reshape(groups, weight_like.shape[0] // groups, -1)

    def from_groups(self, maps: Tensor, shape: Sequence[int]) -> Tensor:
        """The inverse of :meth:`as_groups`, over leading dimensions.

        Args:
            maps: Shape ``(..., G, d_out, d_in)``.
            shape: The weight's shape.

        Returns:
            Shape ``(..., *shape)``.
        """
        ordered = maps.mT if self.transposed else maps
        return ordered.reshape(*maps.shape[:-3], *shape)

    def bias_features(self, module: nn.Module) -> int:
        """The bias's size (with :attr:`separate_bias`, its own factor's).

        Args:
            module: The module.

        Returns:
            ``d_b``.
        """
        return module.get_parameter(self.bias_name).numel()


def registered_kinds() -> tuple[LayerKind, ...]:
    """Every registered kind, in the order they are asked.

    Returns:
        The kinds, most specific first.
    """
    return tuple(LayerKind._registry)


def kind_of(
    model: nn.Module, module_name: str, module: nn.Module, param_name: str
) -> tuple[LayerKind, str] | None:
    """The kind that applies a parameter, and its layer's name.

    Args:
        model: The network.
        module_name: The module's name.
        module: The module.
        param_name: A parameter of it.

    Returns:
        ``(kind, layer name)``, or ``None`` (a diagonal block).
    """
    for kind in LayerKind._registry:
        name = kind.claims(model, module_name, module, param_name)
        if name is None:
            continue
        if kind.unsupported(module) is not None:
            return None
        return kind, name
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a Kronecker kind's class cannot have Kronecker blocks.

    Args:
        module: Any module.

    Returns:
        The first registered kind's reason for its class, or ``None``.
    """
    for kind in LayerKind._registry:
        if kind.assumed_class(module) is not None:
            reason = kind.unsupported(module)
            if reason is not None:
                return reason
    return None


def as_rows(tensor: Tensor) -> Tensor:
    """``(B, ..., d)`` as ``(B, S, d)``, the middle dimensions as positions.

    Also for ``B = 0`` (an expert that no example was routed to), where
    ``reshape(0, -1, d)`` cannot tell ``S``.

    Args:
        tensor: At least 2-D, the batch first.

    Returns:
        A view where possible.
    """
    positions = math.prod(tensor.shape[1:-1])
    return tensor.reshape(tensor.shape[0], positions, tensor.shape[-1])
