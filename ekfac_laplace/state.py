"""A saved EKFAC posterior: what its state holds, checked before it is loaded.

``state_dict()`` is laplace-torch's state (the mean, the curvature ``H``, the loss,
the prior, the noise, the data and output counts, the likelihood, the temperature)
with ``H`` as one ``(λ, *eigenvectors)`` tuple of tensors per parameter tensor and
the options as ``"ekfac_options"``: plain values only, which ``torch.load(...,
weights_only=True)`` reads. A last-layer state names its last layer
(``"_last_layer_name"``) and holds no training data (``"data"`` is ``None``).

:func:`checked_state` validates a state against the model it is loaded into before
the Laplace object changes at all: every block's kind (a Kronecker block only where
the model's module can have one), the exact shapes of its eigenvectors and
eigenvalues, finite non-negative eigenvalues, finite orthonormal eigenvectors, a
finite mean of the right length, and every hyperparameter. A state from a mirrored
architecture (``Linear(4, 6)-Linear(6, 4)`` into ``Linear(6, 4)-Linear(4, 6)``,
the same block sizes) is refused by the shapes.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ekfac_laplace.blocks import structure_named
from ekfac_laplace.factors import accumulation_dtype
from ekfac_laplace.fitted import FittedLayout
from ekfac_laplace.layer import KroneckerLayer
from ekfac_laplace.layout import (
    EXACT,
    FITTED_DIAGONAL,
    KRONECKER,
    DiagonalModule,
    ParameterLayout,
)
from ekfac_laplace.matrix import EKFACDecomposed
from ekfac_laplace.options import EKFACOptions
from ekfac_laplace.sketch import corrected_matrix

#: How far ``QᵀQ`` may be from ``I`` (largest entry), by the eigenvectors' dtype.
ORTHONORMALITY_TOLERANCES = {torch.float64: 1e-8, torch.float32: 1e-3}
#: Eigenvalues below ``-NEGATIVE_TOLERANCE · max|λ|`` of their block are refused
#: (a fit clamps them at zero; online fits add such blocks).
NEGATIVE_TOLERANCE = 1e-6


#: The keys of laplace-torch's ``ParametricLaplace.state_dict``.
STATE_KEYS = (
    "mean",
    "H",
    "loss",
    "prior_mean",
    "prior_precision",
    "sigma_noise",
    "n_data",
    "n_outputs",
    "likelihood",
    "temperature",
    "enable_backprop",
    "cls_name",
)


def check_state_header(
    state_dict: dict[str, Any],
    cls_name: str,
    likelihood: str,
    extra_keys: tuple[str, ...] = (),
) -> None:
    """The checks of a state that need no model: keys, class, likelihood.

    Args:
        state_dict: The state to load.
        cls_name: The loading class's name.
        likelihood: The loading object's likelihood.
        extra_keys: Keys the class adds to laplace-torch's :data:`STATE_KEYS`.

    Raises:
        KeyError: If a key is missing.
        ValueError: If the state is from another class or likelihood.
    """
    missing = [key for key in STATE_KEYS + extra_keys if key not in state_dict]
    if missing:
        raise KeyError(
            f"The state has no {missing}; pass the dict that "
            f"{cls_name}.state_dict() returned."
        )
    if state_dict["cls_name"] != cls_name:
        raise ValueError(
            f"The state is from {state_dict['cls_name']!r}, not "
            f"{cls_name}; load it into the class that saved it."
        )
    if state_dict["likelihood"] != likelihood:
        raise ValueError(
            f"The state is for likelihood {state_dict.get('likelihood')!r}, this "
            f"Laplace uses {likelihood!r}."
        )


@dataclass
class CheckedState:
    """A validated state, ready to be set on a Laplace object.

    Attributes:
        curvature: ``H`` on the model's device.
        options: The EKFAC options it was fitted with.
        layout: The fitted layout.
        diagonals: With a ``correction_rank``: a corrected block's index to its
            ``diag(R)`` (``curvature`` has the corrections).
    """

    curvature: EKFACDecomposed
    options: EKFACOptions
    layout: FittedLayout
    diagonals: dict[int, Tensor] = field(default_factory=dict)


def checked_state(
    state: Mapping[str, Any],
    model: nn.Module,
    params: Sequence[Tensor],
    n_params: int,
    n_layers: int,
    mean_params: Sequence[Tensor] | None = None,
) -> CheckedState:
    """Validate a state against the model it is loaded into; change nothing.

    Args:
        state: The state (keys, class and likelihood already checked).
        model: The network the posterior is over.
        params: The posterior's parameters, in vector order.
        n_params: The length of the mean vector.
        n_layers: The number of parameter tensors a per-layer prior has.
        mean_params: The parameters the mean vector holds (``params`` if
            ``None``; a last layer's mean holds its frozen ones too).

    Returns:
        The curvature and the options.

    Raises:
        ValueError: Naming the first thing that does not fit, also a mean that is
            not the model's current parameters (a state fitted at other weights).
    """
    options = EKFACOptions.from_state(state.get("ekfac_options", ()))
    saved = state.get("ekfac_layout")
    fitted = None if saved is None else FittedLayout.from_plain(saved)
    curvature, layout = checked_curvature(state["H"], model, params, fitted, options)
    _check_vector("mean", state["mean"], n_params)
    _check_mean_is_the_model(
        state["mean"], params if mean_params is None else mean_params
    )
    prior_mean = state["prior_mean"]
    if isinstance(prior_mean, Tensor) and prior_mean.numel() > 1:
        _check_vector("prior_mean", prior_mean, n_params)
    else:
        _check_finite_number("prior_mean", prior_mean)
    _check_prior(state["prior_precision"], n_layers)
    for name in ("sigma_noise", "temperature"):
        _check_positive(name, state[name])
    _check_finite_number("loss", state["loss"])
    for name in ("n_data", "n_outputs"):
        value = state[name]
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 1:
            raise ValueError(
                f"The state's {name} must be a positive count, got {value!r}."
            )
    if not isinstance(state["enable_backprop"], bool):
        raise ValueError(
            f"The state's enable_backprop must be True or False, got "
            f"{state['enable_backprop']!r}."
        )
    corrections = checked_corrections(
        state.get("ekfac_corrections"), curvature, options, layout
    )
    diagonals = {index: curvature.eigenvalues[index] for index in corrections}
    if corrections:
        curvature = corrected_matrix(
            curvature.eigenvectors, curvature.eigenvalues, corrections
        )
    return CheckedState(curvature, options, layout, diagonals)


def checked_corrections(
    saved: Any,
    curvature: EKFACDecomposed,
    options: EKFACOptions,
    fitted: FittedLayout,
) -> dict[int, tuple[Tensor, Tensor]]:
    """A state's low-rank corrections, checked against its blocks and options.

    Args:
        saved: ``"ekfac_corrections"``: ``(index, U, S)`` per corrected block (or
            ``None``).
        curvature: The state's checked ``H`` (``diag(R)`` of every block).
        options: The fit's options.
        fitted: The state's fitted layout (which blocks are corrected).

    Returns:
        Block index to ``(U, S)``, on the curvature's device.

    Raises:
        ValueError: For corrections other than the fitted layout's, or without a
            ``correction_rank``, or a correction that does not fit its block
            (shapes other than its layout's pairs, more than ``k`` pairs, negative
            or non-finite values, ``U`` not orthonormal).
    """
    rank = options.correction_rank
    expected = {
        index: block.correction
        for index, block in enumerate(fitted.blocks)
        if block.correction
    }
    found = sorted(int(entry[0]) for entry in saved or ())
    if found != sorted(expected) or (found and not rank):
        raise ValueError(
            f"The state holds low-rank corrections of blocks {found} but its fitted "
            f"layout corrects blocks {sorted(expected)} (correction_rank={rank}): "
            "the state is corrupt. Fit again."
        )
    corrections = {}
    device = curvature.eigenvalues[0].device
    for index, U, S in saved or ():
        where = f"block {index}"
        structure = fitted.blocks[index].structure  # (index is the layout's)
        if structure != KRONECKER:
            raise ValueError(
                f"The state's correction of {where} is on a block of structure "
                f"{structure!r}, not a Kronecker one: the state is corrupt. Fit again."
            )
        n, pairs = curvature.eigenvalues[index].numel(), expected[index]
        if pairs > rank or tuple(U.shape) != (n, pairs) or tuple(S.shape) != (pairs,):
            raise ValueError(
                f"The state's correction of {where} has U {tuple(U.shape)} and S "
                f"{tuple(S.shape)}, but its block of {n} entries, whose fitted "
                f"layout keeps {pairs} pairs (correction_rank={rank}), needs U "
                f"({n}, {pairs}) and S ({pairs},): the state is corrupt. Fit again."
            )
        _check_eigenvalues(where, S)
        _check_orthonormal(where, U)
        corrections[index] = (U.to(device), S.to(device))
    return corrections


def checked_curvature(
    saved: Any,
    model: nn.Module,
    params: Sequence[Tensor],
    fitted: FittedLayout | None = None,
    options: EKFACOptions | None = None,
) -> tuple[EKFACDecomposed, FittedLayout]:
    """The saved ``H``, checked block by block against ``params``.

    Args:
        saved: ``H`` as :meth:`EKFACDecomposed.to_state` wrote it.
        model: The network.
        params: The posterior's parameters, in vector order.
        fitted: The state's fitted layout; ``None`` for a state saved before the
            layout was (it is then migrated once from the shapes of its bases).
        options: The fit's options.

    Returns:
        The matrix, on the parameters' device, and its fitted layout.

    Raises:
        ValueError: For another structure, number of blocks, kind of block or
            shape, non-finite or negative eigenvalues, or eigenvectors that are
            not finite and orthonormal.
    """
    decomposed = EKFACDecomposed.from_state(saved)
    sizes = [p.numel() for p in params]
    if decomposed.block_sizes != sizes:
        raise ValueError(
            f"The state's EKFAC blocks have sizes {decomposed.block_sizes} but this "
            f"model's parameter tensors have sizes {sizes}; load it into the model "
            "it was fitted on."
        )
    if fitted is None:
        fitted = migrated_layout(model, params, decomposed, options)
    layout = ParameterLayout.from_fitted(model, params, fitted, options)
    device = params[0].device
    eigenvectors, eigenvalues = [], []
    for index, (block, param) in enumerate(zip(fitted.blocks, params)):
        where = repr(block.qualified_name)
        basis = decomposed.eigenvectors[index]
        values = decomposed.eigenvalues[index]
        expected = (tuple(values.shape), [tuple(q.shape) for q in basis])
        if expected != (block.values, [tuple(shape) for shape in block.bases]):
            raise ValueError(
                f"The state's block of {where} has eigenvalues of shape "
                f"{expected[0]} and eigenvectors of shapes {expected[1]}, but its "
                f"fitted layout says {block.values} and {list(block.bases)}: the "
                "state is corrupt. Fit again."
            )
        _check_block_shapes(layout, index, param, where, expected)
        _check_eigenvalues(where, values)
        for q in basis:
            _check_orthonormal(where, q)
        eigenvectors.append(tuple(q.to(device) for q in basis))
        eigenvalues.append(values.to(device))
    return EKFACDecomposed(eigenvectors, eigenvalues), fitted


def _check_block_shapes(
    layout: ParameterLayout,
    index: int,
    param: Tensor,
    where: str,
    found: tuple[tuple[int, ...], list[tuple[int, ...]]],
) -> None:
    """Refuse a block whose shapes are not those its structure needs here."""
    owner, structure = layout.owners[index], layout.structure(index)
    if structure == KRONECKER:
        expected = owner.block_shapes(index)
    else:
        expected = structure_named(structure).shapes(param)
    if found != expected:
        raise ValueError(
            f"The state's block of {where} has eigenvalues of shape {found[0]} "
            f"and eigenvectors of shapes {found[1]}, but this model's parameter "
            f"of shape {tuple(param.shape)} needs {expected[0]} and "
            f"{expected[1]}: the state is from another architecture. Load it "
            "into the model it was fitted on."
        )


def migrated_layout(
    model: nn.Module,
    params: Sequence[Tensor],
    decomposed: EKFACDecomposed,
    options: EKFACOptions | None = None,
) -> FittedLayout:
    """The fitted layout of a state saved before states held it (round three).

    Read once, on loading such a state, from the shapes of its bases: ``()`` is a
    diagonal block, one basis over a whole weight (or a grouped layer's whole
    bias) an exact block, as is a bias with one basis beside an exact weight.

    Args:
        model: The network.
        params: The posterior's parameters, in vector order.
        decomposed: The state's ``H``.
        options: The fit's options.

    Returns:
        The layout, checked afterwards like a saved one.
    """
    bases = decomposed.eigenvectors
    layout = ParameterLayout(model, params, options, guard_sizes=False)
    layout = layout.with_diagonal(
        {
            owner.name: FITTED_DIAGONAL
            for owner, basis in zip(layout.owners, bases)
            if isinstance(owner, KroneckerLayer) and not basis
        }
    )
    dense = set(layout.dense) | {
        index
        for index, (owner, basis) in enumerate(zip(layout.owners, bases))
        if len(basis) == 1
        and (
            isinstance(owner, DiagonalModule)
            or index in (owner.weight_index, owner.dense_weight_index)
            or (
                owner.groups > 1 and not owner.kind.separate_bias and basis[0].ndim == 2
            )
        )
    }
    dense |= {  # a bias beside an exact weight: never smaller, so exact as well
        owner.bias_index
        for owner in layout.layers
        if owner.bias_index is not None
        and owner.weight_index in dense
        and len(bases[owner.bias_index]) == 1
    }
    if dense != layout.dense:
        layout = layout.with_dense({index: EXACT for index in dense})
    return layout.fitted_layout(bases, decomposed.eigenvalues)


def _check_eigenvalues(where: str, values: Tensor) -> None:
    if not values.is_floating_point() or not bool(torch.isfinite(values).all()):
        raise ValueError(
            f"The state's eigenvalues of {where} are not finite floating-point "
            "numbers (NaN or Inf); the state is corrupt. Fit again."
        )
    if values.numel() == 0:
        return
    scale = float(values.abs().max())
    lowest = float(values.min())
    if lowest < -NEGATIVE_TOLERANCE * scale:
        raise ValueError(
            f"The state's eigenvalues of {where} go down to {lowest:.3g}; a GGN or "
            "Fisher has none below zero (beyond round-off). The state is corrupt or "
            "not an EKFAC curvature; fit again."
        )


def _check_orthonormal(where: str, q: Tensor) -> None:
    if not q.is_floating_point() or not bool(torch.isfinite(q).all()):
        raise ValueError(
            f"The state's eigenvectors of {where} are not finite floating-point "
            "numbers; the state is corrupt. Fit again."
        )
    tolerance = ORTHONORMALITY_TOLERANCES.get(accumulation_dtype(q.dtype), 1e-3)
    precise = q.double()
    identity = torch.eye(q.shape[-1], dtype=torch.float64, device=q.device)
    error = float((precise.mT @ precise - identity).abs().max()) if q.numel() else 0.0
    if error > tolerance:
        raise ValueError(
            f"The state's eigenvectors of {where} are not orthonormal "
            f"(max |QᵀQ − I| = {error:.2g}); the state is corrupt. Fit again."
        )


def _check_vector(name: str, value: Any, length: int) -> None:
    if not isinstance(value, Tensor) or tuple(value.shape) != (length,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value)
        raise ValueError(
            f"The state's {name} has shape {shape}, but this model's posterior has "
            f"{length} parameters; load it into the model it was fitted on."
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"The state's {name} is not finite (NaN or Inf); the state is corrupt."
        )


#: Largest difference ``max |mean − θ| / (1 + max |θ|)`` between a state's mean
#: and the model's parameters that is rounding (a state saved in float32 and
#: loaded into a float64 model, or the reverse): a model with other weights
#: differs by far more.
MEAN_TOLERANCE = 1e-6


def _check_mean_is_the_model(mean: Tensor, params: Sequence[Tensor]) -> None:
    """Refuse a state fitted at other weights than the model holds now."""
    current = torch.cat([p.detach().reshape(-1) for p in params]).to(
        device=mean.device, dtype=torch.float64
    )
    difference = (mean.detach().double() - current).abs()
    largest = float(difference.max())
    if largest <= MEAN_TOLERANCE * (1.0 + float(current.abs().max())):
        return
    entry = int(difference.argmax())
    raise ValueError(
        "The state's mean differs from the model's parameters (largest difference "
        f"{largest:.3g}, at entry {entry} of the parameter vector): the posterior "
        "was fitted at other weights than the model holds now, and its predictive "
        "would mix the two. Load the weights it was fitted at into the model first "
        "(model.load_state_dict(...)), then the Laplace state; or fit again."
    )


def _check_finite_number(name: str, value: Any) -> None:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not torch.isfinite(torch.as_tensor(float(value)))
    ):
        raise ValueError(f"The state's {name} must be a finite number, got {value!r}.")


def _check_positive(name: str, value: Any) -> None:
    tensor = torch.as_tensor(value) if isinstance(value, numbers.Real) else value
    if (
        not isinstance(tensor, Tensor)
        or tensor.numel() != 1
        or not bool(torch.isfinite(tensor).all())
        or float(tensor) <= 0
    ):
        raise ValueError(
            f"The state's {name} must be one finite, positive number, got {value!r}."
        )


def _check_prior(value: Any, n_layers: int) -> None:
    tensor = torch.as_tensor(value) if isinstance(value, numbers.Real) else value
    if (
        not isinstance(tensor, Tensor)
        or tensor.ndim > 1
        or tensor.numel() not in (1, n_layers)
    ):
        raise ValueError(
            f"The state's prior_precision must be a scalar or one value per "
            f"parameter tensor ({n_layers}), got {value!r:.80}."
        )
    if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise ValueError(
            f"The state's prior_precision must be finite and non-negative, got "
            f"{tensor.flatten()[:8].tolist()}."
        )


@contextmanager
def restored_on_failure(laplace: object, model: nn.Module) -> Iterator[None]:
    """Put every attribute of ``laplace`` back if the block raises.

    Args:
        laplace: The Laplace object being loaded.
        model: Its model (laplace-torch sets ``model.output_size``).

    Yields:
        Nothing.
    """
    attributes = dict(vars(laplace))
    missing = object()
    output_size = getattr(model, "output_size", missing)
    try:
        yield
    except BaseException:
        vars(laplace).clear()
        vars(laplace).update(attributes)
        if output_size is missing:
            vars(model).pop("output_size", None)
        else:
            model.output_size = output_size
        raise
