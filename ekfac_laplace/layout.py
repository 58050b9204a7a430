"""Where each parameter lives and which block it gets.

A Laplace posterior over parameters ``θ = (θ_1, ..., θ_B)`` has one block per
parameter tensor. :class:`ParameterLayout` maps each tensor to the module that
applies it and decides its block: a Kronecker-factored eigenbasis for the weight and
bias of every layer of a registered kind (:mod:`ekfac_laplace.kinds`: ``Linear``,
convolutions and transposed convolutions, GPT-2's ``Conv1D``, attention
projections), a diagonal block (EKFAC in the identity basis) for every other
parameter, or a refusal (weight tying, a foreign tensor,
``unsupported_layers="raise"``).

A module of a Kronecker kind gets Kronecker blocks only if the parameters of it in
the posterior are exactly its weight and bias: a pruned layer (``weight_orig``), an
old-style weight norm (``weight_g``, ``weight_v``) or a parametrised weight
(``parametrizations.weight.original``, owned by the layer it parametrises) gets
diagonal blocks, computed through the module's own forward. The assumption
``y = W x + b`` itself is checked on real data before a fit
(:mod:`ekfac_laplace.layer_check`), which moves every layer that fails it to
diagonal blocks (``diagonal_layers``). A Kronecker factor too large for memory is
refused before any work, or, with ``max_factor_size``, moved to diagonal blocks.

What these modules see in a forward pass is recorded by
:class:`~ekfac_laplace.capture.ForwardCapture`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ekfac_laplace.blocks import claiming_structure, structure_named
from ekfac_laplace.diagonal import check_diagonal_module
from ekfac_laplace.fitted import FittedBlock, FittedLayout
from ekfac_laplace.kinds import registered_kinds, unsupported_reason
from ekfac_laplace.layer import KroneckerLayer, LayerBasis
from ekfac_laplace.module_kinds import module_kind
from ekfac_laplace.options import EKFACOptions, UnsupportedLayers

#: Without ``max_factor_size``, a Kronecker factor larger than this (in the
#: accumulation dtype) is refused before any work: it, its eigenvectors and
#: ``eigh``'s workspace would not fit a usual machine, and its ``eigh`` would take
#: hours.
FACTOR_LIMIT_BYTES = 2**31


class ParameterBlock(NamedTuple):
    """One parameter tensor of the posterior: its owner and its kind of block.

    Attributes:
        module: Name of the module that applies it in the model.
        name: Name of the parameter in that module (``"weight"``, ``"bias"``,
            ``"weight_orig"``, ``"parametrizations.weight.original"``, ...).
        diagonal: ``True`` for a diagonal block (EKFAC in the identity basis).
        dense: ``True`` for an exact (dense) block (``dense_blocks_up_to``).
    """

    module: str
    name: str
    diagonal: bool
    dense: bool = False


@dataclass
class DiagonalModule:
    """A module whose parameters in the posterior get diagonal blocks.

    Attributes:
        name: The module's name in the model.
        module: The module.
        param_names: Its parameters in the posterior (names relative to it, e.g.
            ``"weight"`` or ``"parametrizations.weight.original"``).
        indices: Their block indices.
        dense: Per parameter, whether its block is exact (dense) rather than
            diagonal.
    """

    name: str
    module: nn.Module
    param_names: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    dense: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dense += [False] * (len(self.param_names) - len(self.dense))

    @property
    def target(self) -> Tensor:
        """A parameter to back-propagate to so that gradients reach the module."""
        return self.module.get_parameter(self.param_names[0])


class ParameterLayout:
    """The blocks of a posterior over ``params`` and the modules that own them.

    Args:
        model: The network.
        params: The posterior's parameters, in vector order.
        options: The fit's options: ``unsupported_layers`` (``"diagonal"``:
            parameters of modules KFAC cannot factorise get diagonal blocks;
            ``"raise"``: refuse them), ``max_factor_size`` (layers whose Kronecker
            factor would have more rows get diagonal blocks; ``None``: a factor
            larger than :data:`FACTOR_LIMIT_BYTES` is refused) and
            ``dense_blocks_up_to`` (tensors with at most this many entries get
            their exact block).
        diagonal_layers: Kronecker layers that get diagonal blocks instead, each
            with the reason (they failed :mod:`~ekfac_laplace.layer_check`, or a
            fit gave them diagonal blocks).
        dense_blocks: Exactly the blocks with a per-example structure (exact, or
            another registered one), by index (a fit's, see :meth:`from_fitted`),
            instead of those the registered structures claim.
        guard_sizes: Refuse (or, with ``max_factor_size``, move to diagonal
            blocks) factors and exact blocks too large for memory; off for a
            fitted layout, whose fit did so.

    Attributes:
        params: The parameters, in vector order.
        options: The options it was laid out with.
        blocks: One :class:`ParameterBlock` per parameter tensor, in order.
        layers: The Kronecker-factored layers, in order of first appearance.
        diagonal_modules: The modules with diagonal blocks, in that order.
        owners: Per block, its :class:`KroneckerLayer` or :class:`DiagonalModule`.
        demoted: Layer name to why a module of a Kronecker kind got diagonal blocks
            (its parameters are not its plain weight and bias, ``diagonal_layers``,
            ``max_factor_size``).

    Raises:
        ValueError: For a tensor that is not a parameter of ``model``, a parameter
            shared by several modules (weight tying) with
            ``unsupported_layers="raise"``, an unsupported module with
            ``unsupported_layers="raise"``, a module whose per-example curvature
            is undefined (batch norm in training mode, ``Embedding(max_norm=...)``),
            or an attention's out-projection that cannot have Kronecker blocks.
        MemoryError: For a Kronecker factor larger than
            :data:`FACTOR_LIMIT_BYTES` without ``max_factor_size``.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        options: EKFACOptions | None = None,
        *,
        diagonal_layers: Mapping[str, str] | None = None,
        dense_blocks: Mapping[int, str] | None = None,
        guard_sizes: bool = True,
    ) -> None:
        if not params:
            raise ValueError(
                "The posterior has no parameters: every parameter has "
                "requires_grad=False. Unfreeze the parameters to treat as random."
            )
        self.model = model
        self.params: list[Tensor] = list(params)
        self.options = EKFACOptions() if options is None else options
        self.unsupported_layers = self.options.unsupported_layers
        self.guard_sizes = guard_sizes
        self.diagonal_layers: dict[str, str] = dict(diagonal_layers or {})
        #: Block index to its per-example structure (:mod:`ekfac_laplace.blocks`:
        #: exact, or another registered one that claims the tensor).
        self.row_structures: dict[int, str] = (
            {
                index: structure.name
                for index, param in enumerate(self.params)
                if (structure := claiming_structure(param, self.options)) is not None
            }
            if dense_blocks is None
            else dict(dense_blocks)
        )
        if guard_sizes:
            for index, name in self.row_structures.items():
                if name == EXACT:
                    _check_dense_block_size(index, self.params[index])
        owners = _owners(model)
        uses = [_uses(owners, param) for param in self.params]
        #: Block index of a tied parameter (applied by several modules) to every
        #: ``(module name, parameter name, module)`` applying it: a diagonal block
        #: whose per-example gradients are the sums over its uses.
        self.tied: dict[int, list[tuple[str, str, nn.Module]]] = {
            index: found for index, found in enumerate(uses) if len(found) > 1
        }
        if self.tied:
            self._check_tied()
        resolved = [found[0] for found in uses]
        self._assign(resolved, self.diagonal_layers)
        #: Layer name to why ``max_factor_size`` gave it diagonal blocks.
        self.oversized = self._oversized_layers() if guard_sizes else {}
        if self.oversized:
            self._assign(resolved, {**self.diagonal_layers, **self.oversized})

    def _check_tied(self) -> None:
        """Refuse tied parameters under ``"raise"``; no exact block for them."""
        index, found = next(iter(self.tied.items()))
        names = [_qualified_name(name, param) for name, param, _ in found]
        if self.unsupported_layers == UnsupportedLayers.RAISE:
            raise ValueError(
                f"The parameter {names[0]} is shared by several modules ({names}: "
                "weight tying), so KFAC cannot factorise its curvature. Use "
                "unsupported_layers='diagonal' (the default) for its exact "
                "diagonal block (per example, the sum of the uses' gradients), "
                "untie the weights, or freeze it with requires_grad_(False)."
            )
        for index in self.tied:
            self.row_structures.pop(index, None)
        for found in self.tied.values():
            for module_name, _, _ in found:  # the whole module on diagonal blocks
                self.diagonal_layers.setdefault(
                    module_name,
                    f"shares a parameter with {names} (weight tying)",
                )

    def _assign(
        self,
        resolved: list[tuple[str, str, nn.Module]],
        diagonal_layers: Mapping[str, str],
    ) -> None:
        """Give each parameter its block (sets blocks, owners, layers, ...)."""
        in_posterior: dict[str, set[str]] = {}
        for module_name, param_name, _ in resolved:
            in_posterior.setdefault(module_name, set()).add(param_name)
        layers: dict[str, KroneckerLayer] = {}
        diagonal: dict[str, DiagonalModule] = {}
        self.demoted: dict[str, str] = {}
        self.blocks: list[ParameterBlock] = []
        self.owners: list[KroneckerLayer | DiagonalModule] = []
        for index, (module_name, param_name, module) in enumerate(resolved):
            found = KroneckerLayer.owning(self.model, module_name, module, param_name)
            reason = None
            if found is not None:
                reason = found.not_plain_reason(in_posterior[module_name])
                if reason is None:
                    reason = diagonal_layers.get(found.name)
                if reason is None:
                    layer = layers.setdefault(found.name, found)
                    kind = "bias" if param_name == layer.bias_name else "weight"
                    dense = index in self.dense
                    prefix = "dense_" if dense else ""
                    setattr(layer, f"{prefix}{kind}_index", index)
                    self.blocks.append(
                        ParameterBlock(module_name, param_name, False, dense)
                    )
                    self.owners.append(layer)
                    continue
                if found.kind.applied_by_parent and found.module is not found.attention:
                    raise ValueError(found.functional_refusal(reason))
                self.demoted.setdefault(found.name, reason)
            dense = index in self.dense  # an exact block, not a diagonal one
            if self.unsupported_layers == UnsupportedLayers.RAISE and not dense:
                raise ValueError(
                    _unsupported_message(module_name, param_name, module, reason)
                )
            entry = _diagonal_entry(diagonal, module_name, module, param_name, index)
            entry.dense.append(dense)
            self.blocks.append(
                ParameterBlock(module_name, param_name, not dense, dense)
            )
            self.owners.append(entry)
        for index, found in self.tied.items():  # the other uses of tied parameters
            for module_name, param_name, module in found[1:]:
                entry = _diagonal_entry(
                    diagonal, module_name, module, param_name, index
                )
                entry.dense.append(False)
        self.layers: list[KroneckerLayer] = list(layers.values())
        self.diagonal_modules: list[DiagonalModule] = list(diagonal.values())

    @classmethod
    def from_fitted(
        cls,
        model: nn.Module,
        params: Sequence[Tensor],
        fitted: FittedLayout,
        options: EKFACOptions | None = None,
    ) -> ParameterLayout:
        """The layout a fit gave ``params``, rebuilt from its fitted layout.

        Args:
            model: The network.
            params: The posterior's parameters, in vector order.
            fitted: The fit's layout (:attr:`EKFACFactors.layout`).
            options: The fit's options.

        Returns:
            The layout, with the fit's structure for every block.

        Raises:
            ValueError: If the fit has another number of blocks, or a block whose
                structure or kind this model cannot give it (the model changed
                since the fit).
        """
        if len(fitted) != len(params):
            raise ValueError(
                f"The fit has {len(fitted)} blocks but there are {len(params)} "
                "parameter tensors; use the model it was fitted on."
            )
        per_example = {
            index: block.structure
            for index, block in enumerate(fitted.blocks)
            if block.structure not in (KRONECKER, DIAGONAL)
        }
        for name in set(per_example.values()):
            structure_named(name)  # a structure this installation has
        layout = cls(
            model, params, options, dense_blocks=per_example, guard_sizes=False
        )
        layout = layout.with_diagonal(
            {
                owner.name: FITTED_DIAGONAL
                for owner, block in zip(layout.owners, fitted.blocks)
                if isinstance(owner, KroneckerLayer) and block.structure == DIAGONAL
            }
        )
        for index, block in enumerate(fitted.blocks):
            structure, kind = layout.structure(index), layout.kind_name(index)
            # A Kronecker block's kind lays out its basis; an exact or diagonal
            # block's is the same whichever module computes its gradients.
            if block.structure != structure or (
                structure == KRONECKER and block.kind != kind
            ):
                raise ValueError(
                    f"The fit gave '{block.qualified_name}' a {block.structure} "
                    f"block (kind {block.kind!r}), but its module cannot have one "
                    f"now: this model gives it a {structure} block (kind {kind!r}). "
                    "The model changed since the fit (pruning, a parametrisation, "
                    "another architecture?): fit again, or load the state into the "
                    "model it was fitted on."
                )
        return layout

    def structure(self, index: int) -> str:
        """The block structure of block ``index``: Kronecker, exact or diagonal."""
        owner = self.owners[index]
        if index in self.row_structures:
            return self.row_structures[index]
        if isinstance(owner, KroneckerLayer):
            return KRONECKER
        return DIAGONAL

    def kind_name(self, index: int) -> str:
        """The kind of block ``index``'s owner: a layer kind or a module kind."""
        owner = self.owners[index]
        if isinstance(owner, KroneckerLayer):
            return owner.kind.name
        return module_kind(owner.module).name

    def fitted_layout(
        self,
        eigenvectors: Sequence[tuple[Tensor, ...]],
        eigenvalues: Sequence[Tensor],
        batch_dims: Mapping[str, int] | None = None,
    ) -> FittedLayout:
        """This layout as a fit's value, with the shapes the fit gave each block.

        Args:
            eigenvectors: Per block, its eigenbasis.
            eigenvalues: Per block, its eigenvalues.
            batch_dims: Where the fit found each module's batch dimension.

        Returns:
            The fitted layout.
        """
        return FittedLayout(
            tuple(
                FittedBlock(
                    block.module,
                    block.name,
                    self.kind_name(index),
                    self.structure(index),
                    tuple(values.shape),
                    tuple(tuple(q.shape) for q in basis),
                )
                for index, (block, basis, values) in enumerate(
                    zip(self.blocks, eigenvectors, eigenvalues)
                )
            ),
            None if batch_dims is None else dict(batch_dims),
        )

    @property
    def dense(self) -> set[int]:
        """The blocks with a per-example structure (exact, or another)."""
        return set(self.row_structures)

    @property
    def has_dense(self) -> bool:
        """Whether any parameter gets an exact (dense) block."""
        return bool(self.dense)

    @property
    def kronecker_layers(self) -> list[KroneckerLayer]:
        """The layers with a Kronecker block (others have only exact blocks)."""
        return [layer for layer in self.layers if layer.has_kronecker]

    @property
    def dense_layers(self) -> list[KroneckerLayer]:
        """The layers with an exact (dense) block."""
        return [
            layer
            for layer in self.layers
            if layer.dense_weight_index is not None
            or layer.dense_bias_index is not None
        ]

    def with_dense(self, indices: Mapping[int, str]) -> ParameterLayout:
        """The same layout with exactly these per-example blocks.

        Args:
            indices: Block index to its structure's name.

        Returns:
            A new layout.
        """
        return ParameterLayout(
            self.model,
            self.params,
            self.options,
            diagonal_layers=self.diagonal_layers,
            dense_blocks=indices,
            guard_sizes=self.guard_sizes,
        )

    def with_diagonal(self, reasons: Mapping[str, str]) -> ParameterLayout:
        """The same layout with more Kronecker layers on diagonal blocks.

        Args:
            reasons: Layer name to why it gets diagonal blocks.

        Returns:
            A new layout (``self`` if ``reasons`` is empty).
        """
        if not reasons:
            return self
        return ParameterLayout(
            self.model,
            self.params,
            self.options,
            diagonal_layers={**self.diagonal_layers, **reasons},
            dense_blocks=self.row_structures,
            guard_sizes=self.guard_sizes,
        )

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def has_diagonal(self) -> bool:
        """Whether any parameter gets a diagonal block."""
        return bool(self.diagonal_modules)

    def backprop_targets(self) -> list[Tensor]:
        """One parameter per module of the layout (see :attr:`KroneckerLayer.target`).

        Back-propagating to these makes the gradient flow to every module's output
        while autograd skips the other weight gradients.

        Returns:
            The parameters, Kronecker layers first.
        """
        targets = [layer.target for layer in self.layers]
        return targets + [entry.target for entry in self.diagonal_modules]

    def layer_bases(
        self, eigenbasis: Sequence[tuple[Tensor, ...]]
    ) -> dict[str, LayerBasis]:
        """Per-block eigenbases regrouped per Kronecker layer (online fitting).

        Args:
            eigenbasis: Per block, ``(Q_G, Q_A)`` (or transposed), ``(Q_G,)``
                (a bias) or ``()``.

        Returns:
            Layer name to its :class:`LayerBasis`.
        """
        bases = {}
        for layer in self.layers:
            q_g = q_a = q_b = None
            if layer.weight_index is not None:
                q_g, q_a, _ = layer.factor_block(eigenbasis[layer.weight_index])
            if layer.bias_index is not None:
                (bias_basis,) = eigenbasis[layer.bias_index]
                if layer.separate_bias:
                    q_b = bias_basis
                elif q_g is None:  # no weight: the bias carries Q_G
                    q_g = bias_basis
            bases[layer.name] = LayerBasis(q_g, q_a, q_b)
        return bases

    def first_diagonal(self) -> ParameterBlock | None:
        """The first parameter with a diagonal block, for messages.

        Returns:
            Its block, or ``None`` if every block is Kronecker-factored.
        """
        return next((block for block in self.blocks if block.diagonal), None)

    def _oversized_layers(self) -> dict[str, str]:
        """Layers over ``max_factor_size`` (to move to diagonal blocks), or refuse.

        Returns:
            Layer name to the reason.

        Raises:
            MemoryError: Without ``max_factor_size``, for a factor larger than
                :data:`FACTOR_LIMIT_BYTES`.
        """
        oversized = {}
        for layer in self.layers:
            for factor, size in layer.factor_sizes().items():
                limit = self.options.max_factor_size
                if limit is not None:
                    if size > limit:
                        oversized[layer.name] = (
                            f"has a Kronecker {factor} factor of {size} rows, more "
                            f"than max_factor_size={limit}"
                        )
                    continue
                dtype = layer.weight.dtype
                if dtype in (torch.float16, torch.bfloat16):
                    dtype = torch.float32  # accumulated in float32
                copies = 1 if factor == "bias" else layer.groups  # one per group
                nbytes = copies * size * size * torch.empty((), dtype=dtype).itemsize
                if nbytes > FACTOR_LIMIT_BYTES:
                    each = f" in each of {copies} groups" if copies > 1 else ""
                    raise MemoryError(
                        f"Layer '{layer.name}' ({type(layer.module).__name__}) needs "
                        f"a Kronecker {factor} factor of {size} × {size}{each} "
                        f"({nbytes / 2**30:.1f} GiB in {dtype}, as much again for "
                        "its eigenvectors, and an eigh of that size), over the "
                        f"limit of {FACTOR_LIMIT_BYTES / 2**30:.0f} GiB. "
                        + _oversized_advice(factor)
                    )
        return oversized


def _oversized_advice(factor: str) -> str:
    """What to do about a Kronecker factor too large for memory."""
    diagonal = (
        "pass max_factor_size=N to give layers with a factor of more than N rows "
        "their exact diagonal block instead"
    )
    if factor == "input":
        return (
            f"Narrow the layer's input, {diagonal}, freeze the layer with "
            "requires_grad_(False), or use subset_of_weights='last_layer'."
        )
    return (
        "A factor over the layer's outputs this large is usually a head over a large "
        "vocabulary: restrict the model's outputs to the classes that matter (the "
        "answer tokens' logits at the last position, as Laplace-LoRA does), put the "
        "posterior over LoRA adapters or other layers and freeze this one with "
        f"requires_grad_(False), or {diagonal} (with the Monte-Carlo Fisher, "
        "backend_kwargs={'stochastic': True}: the exact GGN back-propagates once "
        "per output class)."
    )


def _check_dense_block_size(index: int, param: Tensor) -> None:
    """Refuse an exact block over :data:`FACTOR_LIMIT_BYTES`, before any work."""
    dtype = param.dtype
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # accumulated in float32
    n = param.numel()
    nbytes = n * n * torch.empty((), dtype=dtype).itemsize
    if nbytes > FACTOR_LIMIT_BYTES:
        raise MemoryError(
            f"Parameter tensor {index} ({tuple(param.shape)}, {n} entries) would get "
            f"an exact block of {n} × {n} ({nbytes / 2**30:.1f} GiB in {dtype}, as "
            "much again for its eigenvectors, and an eigh of that size), over the "
            f"limit of {FACTOR_LIMIT_BYTES / 2**30:.0f} GiB. Lower "
            "dense_blocks_up_to below its size."
        )


#: Why a layer has diagonal blocks in :meth:`ParameterLayout.from_fitted`.
FITTED_DIAGONAL = "got diagonal blocks in the fit"
#: Why a layer gets diagonal blocks when every block is asked to be diagonal.
REQUESTED_DIAGONAL = "was asked for diagonal blocks"
#: The block structures' names (:mod:`ekfac_laplace.structures` registers them).
KRONECKER, EXACT, DIAGONAL = "kronecker", "exact", "diagonal"


def _applying_module(
    model: nn.Module, module_name: str, module: nn.Module, param_name: str
) -> tuple[str, str, nn.Module]:
    """The module that applies a parameter, and the parameter's name in it.

    A parametrised tensor (``torch.nn.utils.parametrize``) is owned by a
    ``ParametrizationList`` under ``<module>.parametrizations.<tensor>``, which
    computes the tensor when ``<module>`` reads it: the parameter belongs to
    ``<module>``, named ``parametrizations.<tensor>.original``.
    """
    parts = module_name.split(".") if module_name else []
    for i, part in enumerate(parts):
        if part != "parametrizations":
            continue
        parent_name = ".".join(parts[:i])
        parent = model.get_submodule(parent_name)
        if parametrize.is_parametrized(parent):
            name = ".".join([*parts[i:], param_name])
            return parent_name, name, parent
    return module_name, param_name, module


def _owners(model: nn.Module) -> dict[int, list[tuple[str, str, nn.Module]]]:
    """Parameter id to every ``(module name, parameter name, module)`` applying it."""
    owners: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owner = _applying_module(model, module_name, module, param_name)
            entries = owners.setdefault(id(param), [])
            if all(entry[2] is not owner[2] for entry in entries):
                entries.append(owner)
    return owners


def _diagonal_entry(
    diagonal: dict[str, DiagonalModule],
    module_name: str,
    module: nn.Module,
    param_name: str,
    index: int,
) -> DiagonalModule:
    """Add a parameter to its module's diagonal entry (made if new), checked."""
    check_diagonal_module(module_name, module)
    entry = diagonal.setdefault(module_name, DiagonalModule(module_name, module))
    entry.param_names.append(param_name)
    entry.indices.append(index)
    return entry


def _uses(
    owners: dict[int, list[tuple[str, str, nn.Module]]], param: Tensor
) -> list[tuple[str, str, nn.Module]]:
    """Every module applying ``param`` (several for a tied one); refuse strangers."""
    if id(param) not in owners:
        raise ValueError(
            f"A parameter of shape {tuple(param.shape)} is not a parameter of the "
            "model; pass the model's own parameters."
        )
    return owners[id(param)]


def _qualified_name(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _unsupported_message(
    module_name: str, param_name: str, module: nn.Module, demoted: str | None
) -> str:
    if demoted is not None:
        reason = f"a {type(module).__name__} that {demoted}"
    else:
        why = unsupported_reason(module)
        reason = f"a {type(module).__name__}" + (f" with {why}" if why else "")
    supported = ", ".join(kind.description for kind in registered_kinds())
    return (
        f"Parameter '{module_name}.{param_name}' belongs to {reason}, which KFAC "
        f"cannot factorise (supported: {supported}, with their plain weight and "
        "bias). Use unsupported_layers='diagonal' (the default) for an exact "
        "diagonal block, freeze it with requires_grad_(False), or use "
        "subset_of_weights='last_layer'."
    )
