"""EKFAC of a network's log-likelihood curvature over a whole data set.

The eigenvalue correction needs the *final* Kronecker eigenbasis, so EKFAC cannot be
summed batch by batch the way laplace-torch sums ``Kron`` factors: a first pass
accumulates the Kronecker factors ``A = Σ a aᵀ`` and ``G = Σ g gᵀ`` (whose eigenvectors
give ``Q_A`` and ``Q_G``), a second (or a replay of the first, see
:mod:`ekfac_laplace.engine`) accumulates the corrected eigenvalues
``λ = Σ_n Σ_k (Q_Gᵀ G_{n,k} Q_A)²`` from the per-example (pseudo-)gradients
``G_{n,k}``. :func:`compute_ekfac` validates, lays out the parameters
(:class:`~ekfac_laplace.layout.ParameterLayout`), runs the engine the options name and
returns the result in laplace-torch's scale (:mod:`ekfac_laplace.factors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from laplace.utils.enums import Likelihood
from torch import Tensor, nn

from ekfac_laplace.batches import LaplaceBatches, first_examples
from ekfac_laplace.curvlinops_engine import curvlinops_ekfac
from ekfac_laplace.distributed import ranks_of
from ekfac_laplace.engine import fast_ekfac
from ekfac_laplace.factors import (
    EKFACFactors,
    curvature_likelihood,
    likelihood_loss,
)
from ekfac_laplace.fitted import FittedLayout
from ekfac_laplace.layer_check import CHECK_EXAMPLES, checked_layout
from ekfac_laplace.layout import REQUESTED_DIAGONAL, ParameterLayout
from ekfac_laplace.options import EKFACOptions, Engine


def compute_ekfac(
    model: nn.Module,
    params: Sequence[Tensor],
    batches: LaplaceBatches,
    likelihood: Likelihood | str,
    num_data: int,
    options: EKFACOptions | None = None,
    *,
    eigenbasis: list[tuple[Tensor, ...]] | None = None,
    fitted: FittedLayout | None = None,
    dict_key_x: str = "input_ids",
    progress_bar: bool = False,
    process_group: Any | None = None,
    diagonal_blocks: bool = False,
) -> EKFACFactors:
    """EKFAC of the log-likelihood GGN / Fisher of ``model`` over a whole data set.

    Args:
        model: The network. Parameters of ``nn.Linear`` / ``nn.Conv2d`` get
            Kronecker-factored eigenbases; all others diagonal blocks, the exact
            diagonal of the curvature (``options.unsupported_layers``).
        params: Parameters to approximate the curvature for, in vector order.
        batches: The training data.
        likelihood: ``"classification"`` or ``"regression"``.
        num_data: Number of training points ``N``.
        options: How to compute it (:class:`~ekfac_laplace.EKFACOptions`); the
            defaults (exact GGN, our fast engine) if ``None``.
        eigenbasis: If given, skip the Kronecker-factor pass and compute the corrected
            eigenvalues in this basis (online fitting), with ``fitted``.
        fitted: With ``eigenbasis``: the layout of the fit it is from
            (:attr:`EKFACFactors.layout`); every block keeps its structure.
        dict_key_x: Key of the inputs in dict-like batches (curvlinops engine).
        progress_bar: Show a progress bar over every pass.
        process_group: A ``torch.distributed`` process group for a data-parallel
            fit: ``batches`` is this rank's shard, the result is that of the union
            of the shards on every rank (:mod:`ekfac_laplace.distributed`).
            ``num_data`` is then this rank's share (it sizes the cache).
        diagonal_blocks: Give every tensor its exact diagonal block (the Kronecker
            layers too), e.g. to compare structures
            (:mod:`ekfac_laplace.evaluation.structures`).

    Returns:
        The eigenbases, the corrected eigenvalues (summed over the data, clamped at
        zero), the data term, in laplace-torch's scale, and the fitted layout.

    Before any pass, every block is checked on the first batch
    (:mod:`ekfac_laplace.layer_check`): a layer that does not compute
    ``y = W x + b`` with its parameters gets its exact diagonal block.

    Raises:
        ValueError: For an unsupported likelihood, layer or eigenbasis, a layer
            that fails the check with ``unsupported_layers="raise"``, or a
            non-finite curvature (the message names the layer).
        MemoryError: For a Kronecker factor too large for memory without
            ``options.max_factor_size``.
    """
    options = EKFACOptions() if options is None else options
    likelihood = curvature_likelihood(likelihood)
    _, factor = likelihood_loss(likelihood)
    layout = _layout(model, params, options, eigenbasis, fitted, diagonal_blocks)
    ranks = ranks_of(process_group)
    X = first_examples(batches, CHECK_EXAMPLES)
    layout = checked_layout(model, layout, X, ranks, keep=eigenbasis is not None)
    if options.engine == Engine.FAST:
        engine = fast_ekfac
        keywords = {"ranks": ranks}
    elif ranks.size > 1:
        raise ValueError(
            "A data-parallel fit (process_group) needs engine='fast'; the curvlinops "
            "engine runs in one process."
        )
    else:
        engine = curvlinops_ekfac
        keywords = {"dict_key_x": dict_key_x}
    raw = engine(
        model,
        layout,
        batches,
        likelihood,
        num_data,
        options,
        eigenbasis=eigenbasis,
        progress_bar=progress_bar,
        **keywords,
    )
    _check_finite(raw, layout)
    raw.layout = layout.fitted_layout(
        raw.eigenvectors, raw.eigenvalues, raw.batch_dims
    ).with_corrections({i: U.shape[1] for i, (U, _) in raw.corrections.items()})
    return raw.scaled(factor)


def _layout(
    model: nn.Module,
    params: Sequence[Tensor],
    options: EKFACOptions,
    eigenbasis: list[tuple[Tensor, ...]] | None,
    fitted: FittedLayout | None,
    diagonal_blocks: bool,
) -> ParameterLayout:
    """The layout of a fit: the options', or an online fit's previous one."""
    if eigenbasis is None:
        layout = ParameterLayout(model, params, options)
        if diagonal_blocks:
            layout = layout.with_diagonal(
                {layer.name: REQUESTED_DIAGONAL for layer in layout.layers}
            )
        return layout
    if len(eigenbasis) != len(params):
        raise ValueError(
            f"The eigenbasis has {len(eigenbasis)} blocks but there are "
            f"{len(params)} parameter tensors."
        )
    if fitted is None:
        raise ValueError(
            "An online fit in a given eigenbasis needs the layout of the fit it is "
            "from: pass fitted=factors.layout with eigenbasis=factors.eigenvectors."
        )
    return ParameterLayout.from_fitted(model, params, fitted, options)


def _check_finite(raw: EKFACFactors, layout: ParameterLayout) -> None:
    """Refuse a non-finite loss or curvature, naming the block."""
    if not bool(torch.isfinite(raw.loss)):
        raise ValueError(
            "The summed loss over the training data is not finite (NaN or Inf); "
            "check the model's outputs and the targets for NaN/Inf."
        )
    for block, values in zip(layout.blocks, raw.eigenvalues):
        if not torch.isfinite(values).all():
            raise ValueError(
                f"The curvature of '{block.module}.{block.name}' is not finite (NaN "
                "or Inf); check the model's outputs and the data for NaN/Inf."
            )
