"""Where each parameter lives, which block it gets, and what its module sees.

A Laplace posterior over parameters ``θ = (θ_1, ..., θ_B)`` has one block per
parameter tensor. :class:`ParameterLayout` maps each tensor to the module that owns
it and decides its block: a Kronecker-factored eigenbasis for the weight and bias of
``nn.Linear`` / ``nn.Conv2d`` (groups 1, zero padding), a diagonal block (EKFAC in
the identity basis) for every other parameter, or a refusal (weight tying, a foreign
tensor, ``unsupported_layers="raise"``). :class:`ForwardCapture` is the one set of
forward hooks on those modules that both the EKFAC engine and the GLM predictive use:
it records what each module receives in a forward pass, refuses modules that run
more than once, and stores the gradients arriving at their outputs during backward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from ekfac_laplace._compat import tensor_version
from ekfac_laplace.diagonal import check_diagonal_module, detach_inputs
from ekfac_laplace.options import UnsupportedLayers


def kfac_supported(module: nn.Module) -> bool:
    """Whether KFAC factorises the curvature of ``module``'s parameters.

    Args:
        module: Any module.

    Returns:
        ``True`` for ``nn.Linear`` and for ``nn.Conv2d`` with ``groups=1`` and zero
        padding.
    """
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def layer_positions(module: nn.Module, tensor: Tensor, is_input: bool) -> Tensor:
    """Inputs (as patches) or output gradients of a layer as ``(B, S, d)``.

    Args:
        module: An ``nn.Linear`` or ``nn.Conv2d``.
        tensor: The layer's input (``is_input=True``) or an output-shaped tensor.
        is_input: Whether ``tensor`` is the input (``Conv2d``: unfolded to patches).

    Returns:
        Shape ``(B, S, d)`` with ``S`` the positions sharing the weight.
    """
    if isinstance(module, nn.Conv2d):
        if is_input:
            patches = F.unfold(
                tensor,
                module.kernel_size,
                dilation=module.dilation,
                padding=module.padding,
                stride=module.stride,
            )
            return patches.transpose(1, 2)
        return tensor.flatten(start_dim=2).transpose(1, 2)
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])


def group_rows(tensor: Tensor, batch: int, name: str) -> Tensor:
    """Gather the rows of each example of a module's tensor along dimension 1.

    A module usually sees one row per example. A model that folds another
    dimension into the batch before a layer (a reward model scoring a pair of
    completions with ``x.reshape(-1, d)``) gives it ``B·m`` rows; the ``m`` rows of
    example ``n`` are taken to be the consecutive rows ``n·m, …, n·m + m - 1``, as
    row-major flattening lays them out (the engine checks this on its first batch).
    They become positions sharing the weight: ``(B·m, S, ...)`` → ``(B, m·S, ...)``.

    Args:
        tensor: Shape ``(R, S, ...)`` with ``R`` rows.
        batch: The number of examples ``B``.
        name: The module's name, for the message.

    Returns:
        The tensor itself if ``R == B``, else shape ``(B, (R/B)·S, ...)``.

    Raises:
        RowGroupingError: If ``R`` is not a multiple of ``B``.
    """
    rows = tensor.shape[0]
    if rows == batch:
        return tensor
    if rows % batch:
        raise RowGroupingError(name, rows, batch)
    return tensor.reshape(batch, -1, *tensor.shape[2:])


class ParameterBlock(NamedTuple):
    """One parameter tensor of the posterior: its owner and its kind of block.

    Attributes:
        module: Name of the owning module in the model.
        name: Name of the parameter in that module (``"weight"``, ``"bias"``, ...).
        diagonal: ``True`` for a diagonal block (EKFAC in the identity basis).
    """

    module: str
    name: str
    diagonal: bool


@dataclass
class KroneckerLayer:
    """A ``Linear`` / ``Conv2d`` module with Kronecker-factored blocks.

    Attributes:
        name: The module's name in the model.
        module: The module.
        weight_index: Block index of its weight, if the weight is in the posterior.
        bias_index: Block index of its bias, if the bias is in the posterior.
    """

    name: str
    module: nn.Module
    weight_index: int | None = None
    bias_index: int | None = None

    @property
    def out_features(self) -> int:
        """Output width ``d_out`` (channels for ``Conv2d``)."""
        module = self.module
        if isinstance(module, nn.Conv2d):
            return module.out_channels
        return module.out_features

    @property
    def target(self) -> Tensor:
        """A parameter to back-propagate to so that the output gradient flows.

        The bias where there is one: autograd then skips the weight gradient, which
        the factors never use.
        """
        name = "weight" if self.bias_index is None else "bias"
        return self.module.get_parameter(name)


@dataclass
class DiagonalModule:
    """A module whose parameters in the posterior get diagonal blocks.

    Attributes:
        name: The module's name in the model.
        module: The module.
        param_names: Its parameters in the posterior (non-recursive names).
        indices: Their block indices.
    """

    name: str
    module: nn.Module
    param_names: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    @property
    def target(self) -> Tensor:
        """A parameter to back-propagate to so that gradients reach the module."""
        return self.module.get_parameter(self.param_names[0])


class ParameterLayout:
    """The blocks of a posterior over ``params`` and the modules that own them.

    Args:
        model: The network.
        params: The posterior's parameters, in vector order.
        unsupported_layers: ``"diagonal"``: parameters of modules KFAC cannot
            factorise get diagonal blocks; ``"raise"``: refuse them.

    Attributes:
        params: The parameters, in vector order.
        blocks: One :class:`ParameterBlock` per parameter tensor, in order.
        layers: The Kronecker-factored modules, in order of first appearance.
        diagonal_modules: The modules with diagonal blocks, in that order.

    Raises:
        ValueError: For a tensor that is not a parameter of ``model``, a parameter
            shared by several modules (weight tying), an unsupported module with
            ``unsupported_layers="raise"``, or a module whose per-example curvature
            is undefined (batch norm in training mode, ``Embedding(max_norm=...)``).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        unsupported_layers: UnsupportedLayers | str = UnsupportedLayers.DIAGONAL,
    ) -> None:
        if not params:
            raise ValueError(
                "The posterior has no parameters: every parameter has "
                "requires_grad=False. Unfreeze the parameters to treat as random."
            )
        policy = UnsupportedLayers.parse(unsupported_layers, "unsupported_layers")
        self.params: list[Tensor] = list(params)
        owners = _owners(model)
        layers: dict[str, KroneckerLayer] = {}
        diagonal: dict[str, DiagonalModule] = {}
        self.blocks: list[ParameterBlock] = []
        for index, param in enumerate(params):
            module_name, param_name, module = _owner(owners, param)
            if kfac_supported(module):
                layer = layers.setdefault(
                    module_name, KroneckerLayer(module_name, module)
                )
                setattr(layer, f"{param_name}_index", index)
                self.blocks.append(ParameterBlock(module_name, param_name, False))
                continue
            if policy == UnsupportedLayers.RAISE:
                raise ValueError(_unsupported_message(module_name, param_name, module))
            check_diagonal_module(module_name, module)
            entry = diagonal.setdefault(
                module_name, DiagonalModule(module_name, module)
            )
            entry.param_names.append(param_name)
            entry.indices.append(index)
            self.blocks.append(ParameterBlock(module_name, param_name, True))
        self.layers: list[KroneckerLayer] = list(layers.values())
        self.diagonal_modules: list[DiagonalModule] = list(diagonal.values())

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
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Per-block eigenbases regrouped per Kronecker layer (online fitting).

        Args:
            eigenbasis: Per block, ``(Q_G, Q_A)``, ``(Q_G,)`` or ``()``.

        Returns:
            Layer name to ``(Q_G, Q_A)``; ``Q_A`` is ``None`` when the layer's
            weight is not in the posterior.
        """
        bases = {}
        for layer in self.layers:
            if layer.weight_index is None:
                bases[layer.name] = (eigenbasis[layer.bias_index][0], None)
            else:
                q_g, q_a = eigenbasis[layer.weight_index]
                bases[layer.name] = (q_g, q_a)
        return bases

    def first_diagonal(self) -> ParameterBlock | None:
        """The first parameter with a diagonal block, for messages.

        Returns:
            Its block, or ``None`` if every block is Kronecker-factored.
        """
        return next((block for block in self.blocks if block.diagonal), None)


def _owners(model: nn.Module) -> dict[int, list[tuple[str, str, nn.Module]]]:
    """Parameter id to every ``(module name, parameter name, module)`` owning it."""
    owners: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            entries = owners.setdefault(id(param), [])
            if all(entry[2] is not module for entry in entries):
                entries.append((module_name, param_name, module))
    return owners


def _owner(
    owners: dict[int, list[tuple[str, str, nn.Module]]], param: Tensor
) -> tuple[str, str, nn.Module]:
    """The single owner of ``param``, refusing foreign and tied parameters."""
    if id(param) not in owners:
        raise ValueError(
            f"A parameter of shape {tuple(param.shape)} is not a parameter of the "
            "model; pass the model's own parameters."
        )
    entries = owners[id(param)]
    if len(entries) > 1:
        names = [f"{name}.{param_name}" for name, param_name, _ in entries]
        raise ValueError(
            f"The parameter {names[0]} is shared by several modules ({names}: "
            "weight tying), so its curvature mixes their factors. Untie the "
            "weights, or freeze the shared parameter with requires_grad_(False)."
        )
    return entries[0]


def _unsupported_message(module_name: str, param_name: str, module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        reason = f"groups={module.groups}"
    elif isinstance(module, nn.Conv2d):
        reason = f"padding_mode={module.padding_mode!r}"
    else:
        reason = f"a {type(module).__name__}"
    return (
        f"Parameter '{module_name}.{param_name}' belongs to {reason}, which KFAC "
        "cannot factorise (supported: nn.Linear, nn.Conv2d with groups=1 and zero "
        "padding). Use unsupported_layers='diagonal' (the default) for an exact "
        "diagonal block, freeze it with requires_grad_(False), or use "
        "subset_of_weights='last_layer'."
    )


class CaptureError(ValueError):
    """A module of the layout cannot be captured: see the subclasses."""


class ReusedModuleError(CaptureError):
    """A module of the layout ran more than once in one forward pass."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"Module '{name}' runs more than once per forward pass (a reused or tied "
            "layer); EKFAC cannot factorise its curvature, which would mix the uses. "
            "Use a separate module per use, or freeze it with requires_grad_(False)."
        )


class NonTensorOutputError(CaptureError):
    """A module with a diagonal block returned something other than one tensor."""

    def __init__(self, name: str, module: nn.Module, output: object) -> None:
        super().__init__(
            f"Module '{name}' ({type(module).__name__}) returns "
            f"{type(output).__name__}, not a tensor; diagonal blocks need modules "
            "with one tensor output. Freeze its parameters with requires_grad_(False)."
        )


class RowGroupingError(CaptureError):
    """A module sees a number of rows that is not a multiple of the batch size."""

    def __init__(self, name: str, rows: int, batch: int) -> None:
        super().__init__(
            f"Module '{name}' sees {rows} rows for a batch of {batch} examples; "
            "EKFAC needs the rows of each example to be consecutive, as "
            "x.reshape(batch * m, ...) lays them out, so that its per-example "
            "gradients are defined. Keep the batch dimension first in the model."
        )


class ForwardCapture:
    """What the layout's modules see in one forward pass, and their output gradients.

    Used as a context manager around the forward pass: on entry it installs one
    forward hook per module of the layout, on exit it removes them all (also when the
    forward pass raises), so that later calls of the same modules (per-example
    gradients of diagonal blocks) are not seen. During the forward pass it records

    * for each Kronecker layer, its input (detached) in :attr:`inputs` and its output
      with the output's version counter in :attr:`outputs` (an in-place change after
      the layer bumps the version);
    * for each diagonal module (``diagonal=True``), its detached ``(args, kwargs)``
      in :attr:`calls`;

    and it registers a hook on each output that appends the gradient arriving there
    in a backward pass to :attr:`gradients` (outputs that do not require grad get
    none).

    Args:
        layout: The parameter layout whose modules are captured.
        diagonal: Also capture the diagonal modules.
        batch: The number of examples of the forward pass, if known: a diagonal
            module whose output has one row then hands on that row expanded to
            ``batch`` rows, so that each example's output gradient is captured.

    Raises:
        ReusedModuleError: (during the forward pass) if a module runs twice.
        NonTensorOutputError: if a diagonal module returns something else than
            one tensor.
    """

    def __init__(
        self, layout: ParameterLayout, diagonal: bool = True, batch: int | None = None
    ) -> None:
        self.layout = layout
        self.diagonal = diagonal
        self.batch = batch
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, tuple[Tensor, int]] = {}
        self.calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.gradients: dict[str, list[Tensor]] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> ForwardCapture:
        for layer in self.layout.layers:
            hook = functools.partial(self._layer_hook, layer.name)
            self._handles.append(layer.module.register_forward_hook(hook))
        if self.diagonal:
            for entry in self.layout.diagonal_modules:
                hook = functools.partial(self._diagonal_hook, entry.name)
                self._handles.append(
                    entry.module.register_forward_hook(hook, with_kwargs=True)
                )
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def take_gradients(self, name: str) -> list[Tensor]:
        """The output gradients of module ``name`` so far, removing them.

        Args:
            name: A module of the layout.

        Returns:
            One tensor per backward pass (empty if none reached the module).
        """
        return self.gradients.pop(name, [])

    def _first_call(self, name: str) -> None:
        if name in self.inputs or name in self.calls:
            raise ReusedModuleError(name)

    def _watch(self, name: str, output: Tensor) -> None:
        if output.requires_grad:
            output.register_hook(functools.partial(self._store_gradient, name))

    def _store_gradient(self, name: str, gradient: Tensor) -> None:
        self.gradients.setdefault(name, []).append(gradient.detach())

    def _layer_hook(
        self, name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor
    ) -> None:
        self._first_call(name)
        self.inputs[name] = args[0].detach()
        self.outputs[name] = (output, tensor_version(output))
        self._watch(name, output)

    def _diagonal_hook(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> Tensor | None:
        self._first_call(name)
        if not isinstance(output, Tensor):
            raise NonTensorOutputError(name, module, output)
        self.calls[name] = (detach_inputs(args), detach_inputs(kwargs))
        if self._shared(output):
            # One row broadcast to every example (a position embedding called on
            # positions of shape (1, T)): the gradient at the broadcast output would
            # be the batch's sum. Handing on an expanded view, which downstream
            # broadcasting treats alike, gives each example's gradient.
            output = output.expand(self.batch, *output.shape[1:])
            self._watch(name, output)
            return output
        self._watch(name, output)
        return None

    def _shared(self, output: Tensor) -> bool:
        return (
            self.batch is not None
            and self.batch > 1
            and output.ndim > 0
            and output.shape[0] == 1
        )
