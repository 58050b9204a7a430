"""Our EKFAC engine: one backward sweep per batch, the correction from a cache.

curvlinops' ``EKFACLinearOperator`` makes two full passes over the data, each with a
Python loop over examples for the loss-Hessian square root and ``C`` backward passes.
This engine computes the same quantities with

* the loss-Hessian square root in closed form for the whole batch
  (:mod:`ekfac_laplace.output_curvature`);
* back-propagation to one parameter per layer, so autograd skips the weight
  gradients that the factors never use;
* no backward pass at all for a layer whose output is the model output (its factor
  and correction are closed-form);
* the loss-Hessian root of cross-entropy with ``C − 1`` columns (its rank), one
  backward pass fewer per batch than curvlinops' ``C``;
* the first pass's layer inputs and output gradients, or, where fewer numbers (a
  convolution's many positions), its per-example gradients, kept within
  ``cache_budget_bytes`` (256 MiB by default), so that the eigenvalue correction
  needs no second pass (:mod:`ekfac_laplace.accumulators`).

A :class:`~ekfac_laplace.sweep.Sweep` is one batch (:mod:`ekfac_laplace.sweep`);
:class:`FastEKFAC` runs the passes over the data set. Results are in the scale of
the summed torch loss; :func:`ekfac_laplace.compute_ekfac` applies laplace-torch's
likelihood factor.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from laplace.utils.enums import Likelihood
from torch import Tensor, nn
from tqdm.auto import tqdm

from ekfac_laplace.accumulators import (
    CorrectionAccumulator,
    DiagonalSquares,
    FactorAccumulator,
    PassAccumulator,
)
from ekfac_laplace.batches import check_targets, to_device
from ekfac_laplace.dense import DenseBlocks
from ekfac_laplace.distributed import LocalRanks
from ekfac_laplace.factors import EKFACFactors, accumulation_dtype, likelihood_loss
from ekfac_laplace.layer import KroneckerLayer, LayerBasis
from ekfac_laplace.layout import ParameterLayout
from ekfac_laplace.options import EKFACOptions
from ekfac_laplace.output_curvature import OutputCurvature
from ekfac_laplace.sketch import CurvatureSketch
from ekfac_laplace.sweep import Sweep


class PassTotals(NamedTuple):
    """What one pass over the data counted (summed over the ranks in place).

    Attributes:
        loss: The summed loss.
        examples: The examples seen (counted tokens for token-level outputs), as
            a tensor.
        token_level: Whether the outputs were token-level.
    """

    loss: Tensor
    examples: Tensor
    token_level: bool = False

    def tensors(self) -> list[Tensor]:
        """The counts to sum over the ranks (in place).

        Returns:
            ``[loss, examples]``.
        """
        return [self.loss, self.examples]


class FastEKFAC:
    """EKFAC over a data set with :class:`Sweep`: factors, eigenbases, correction.

    Args:
        model: The network.
        layout: Its parameter layout.
        likelihood: ``"classification"`` or ``"regression"``.
        options: How to compute it (``fisher_type``, ``kfac_approx``,
            ``mc_samples``, ``seed``, ``cache_budget_bytes``).
        num_data: Number of training points (projects the cache size).
        progress_bar: Show a progress bar over each pass.
        ranks: The ranks of a data-parallel fit (default: one process). Each makes
            its passes over its shard; the partial sums are summed over the ranks
            after each pass and the eigendecompositions shared out
            (:mod:`ekfac_laplace.distributed`).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParameterLayout,
        likelihood: Likelihood | str,
        options: EKFACOptions,
        num_data: int,
        progress_bar: bool = False,
        ranks: LocalRanks | None = None,
    ) -> None:
        self.model = model
        self.layout = layout
        self.likelihood = likelihood
        self.options = options
        self.num_data = num_data
        self.progress_bar = progress_bar
        self.ranks = LocalRanks() if ranks is None else ranks
        self.sweep = Sweep(model, layout, likelihood, options.mc_per_sequence)
        self.loss_function, _ = likelihood_loss(likelihood)

    def compute(
        self,
        batches: Iterable[tuple[Any, Tensor]],
        eigenbasis: list[tuple[Tensor, ...]] | None = None,
    ) -> EKFACFactors:
        """EKFAC factors in the scale of the summed torch loss.

        Without ``eigenbasis``: a factor pass (which also gives the loss and the
        diagonal blocks), the eigenbases, and the correction from the cache or a
        second pass. With it (online fitting): one correction pass in that basis.

        Args:
            batches: Re-iterable ``(X, y)`` pairs.
            eigenbasis: Fixed eigenbasis per block (online fitting).

        Returns:
            The factors; diagonal blocks have eigenvectors ``()``.
        """
        ranks = self.ranks
        layers = self.layout.kronecker_layers
        dense = DenseBlocks(self.layout)
        diagonal = DiagonalSquares(
            self.layout.diagonal_modules, dense, self.layout.tied
        )
        if eigenbasis is None:
            factors = FactorAccumulator(
                layers,
                self.options.kfac_approx,
                self.options.cache_budget_bytes,
                self.num_data,
            )
            totals = ranks.run(
                lambda: self._pass(
                    batches, "EKFAC: Kronecker factors", factors, diagonal
                ),
                "the Kronecker-factor pass",
            )
            ranks.sum_(
                [
                    *factors.partial_sums(),
                    *diagonal.partial_sums(),
                    *dense.partial_sums(),
                    *totals.tensors(),
                ]
            )
            shared = ranks.share_out(
                len(layers) + len(dense.blocks),
                lambda i: self._eigenbasis(factors, dense, i),
            )
            bases = {
                layer.name: LayerBasis.of(layer, tensors)
                for layer, tensors in zip(layers, shared)
            }
            exact = dict(zip(dense.blocks, shared[len(layers) :]))
            correction = self._correction(bases)

            def correct() -> None:  # from the cache, and a second pass for the rest
                rest = factors.replay(correction)
                if rest:
                    self._pass(
                        batches, "EKFAC: eigenvalue correction", correction, None, rest
                    )

            ranks.run(correct, "the eigenvalue correction")
        else:
            bases = self.layout.layer_bases(eigenbasis)
            correction = self._correction(bases)
            totals = ranks.run(
                lambda: self._pass(
                    batches, "EKFAC: eigenvalue correction", correction, diagonal
                ),
                "the eigenvalue-correction pass",
            )
            ranks.sum_(
                [*diagonal.partial_sums(), *dense.partial_sums(), *totals.tensors()]
            )
            exact = {}  # the new data's exact blocks, merged by the caller
        ranks.sum_(correction.partial_sums(layers))
        factors = self._assemble(bases, correction, diagonal, totals)
        for index, (values, *basis) in exact.items():
            factors.eigenvectors[index] = tuple(basis)
            factors.eigenvalues[index] = values
        if eigenbasis is not None:  # zeros in the old basis; the caller merges
            for index, block in dense.blocks.items():
                param = self.layout.params[index]
                shape = dense.structures[index].shapes(param)[0]
                factors.eigenvectors[index] = eigenbasis[index]
                factors.eigenvalues[index] = block.new_zeros(shape)
            factors.dense = dict(dense.blocks)
        return factors

    def _correction(self, bases: dict[str, LayerBasis]) -> CorrectionAccumulator:
        """The correction pass's accumulator, sketching with a ``correction_rank``."""
        options = self.options
        return CorrectionAccumulator(
            bases,
            self.layout.kronecker_layers,
            options.correction_rank,
            options.correction_examples,
            options.seed,
        )

    def _eigenbasis(
        self, factors: FactorAccumulator, dense: DenseBlocks, item: int
    ) -> list[Tensor]:
        """Eigendecomposition ``item``: the layers' factors, then the other blocks.

        The per-example structures' blocks (exact, or another), by their structure.
        """
        layers = factors.layers
        if item < len(layers):
            return factors.eigenbasis(layers[item]).tensors()
        index = list(dense.blocks)[item - len(layers)]
        block = self.layout.blocks[index]
        basis, values = dense.decompose(
            index,
            f"{self.layout.structure(index)} block of '{block.module}.{block.name}'",
        )
        return [values, *basis]

    def _pass(
        self,
        batches: Iterable[tuple[Any, Tensor]],
        description: str,
        accumulator: PassAccumulator,
        diagonal: DiagonalSquares | None = None,
        layers: list[KroneckerLayer] | None = None,
    ) -> PassTotals:
        """One pass over the data (over ``layers``, default all); what it counted.

        The label sampler is re-seeded at every pass, so both passes of a fit draw
        the same Monte-Carlo labels.
        """
        reference = self.layout.params[0]
        device = reference.device
        generator = torch.Generator(device=device)
        # One stream per rank: reproducible for a given seed and number of ranks.
        generator.manual_seed(self.options.seed + self.ranks.rank)
        dtype = accumulation_dtype(reference.dtype)
        loss = torch.zeros((), dtype=dtype, device=device)
        examples, token_level = 0, False
        progress = tqdm(batches, desc=description, disable=not self.progress_bar)
        for index, (X, y) in enumerate(progress):
            y = y.to(device)
            X = to_device(X, device)
            curvature_fn = functools.partial(self._output_curvature, generator, index)
            f, y_rows = self.sweep.run(
                X, y, curvature_fn, accumulator, diagonal, layers
            )
            loss = loss + self.loss_function(f, y_rows)
            accumulator.batch_done(f.shape[0])
            token_level = token_level or y_rows is not y  # each token an example
            examples += y_rows.shape[0]
        return PassTotals(loss, loss.new_tensor(float(examples)), token_level)

    def _output_curvature(
        self, generator: torch.Generator, batch: int, f: Tensor, y: Tensor
    ) -> OutputCurvature:
        check_targets(f, y, self.likelihood, batch)  # every batch, not the first
        return OutputCurvature(f, y, self.likelihood, self.options, generator)

    def _assemble(
        self,
        bases: dict[str, LayerBasis],
        correction: CorrectionAccumulator,
        diagonal: DiagonalSquares,
        totals: PassTotals,
    ) -> EKFACFactors:
        """Eigenvectors and eigenvalues in block order, the loss and the count."""
        n_blocks = len(self.layout)
        eigenvectors: list[tuple[Tensor, ...]] = [()] * n_blocks
        eigenvalues: list[Tensor | None] = [None] * n_blocks
        for layer in self.layout.kronecker_layers:
            basis = bases[layer.name]
            if layer.weight_index is not None:
                q_g = basis.gradient
                weight = correction.weight_corrections[layer.name]
                if layer.groups == 1:
                    weight = weight.reshape(q_g.shape[0], -1)
                block, values = layer.weight_block(q_g, basis.input, weight)
                eigenvectors[layer.weight_index] = block
                eigenvalues[layer.weight_index] = values
            if layer.bias_index is not None:
                eigenvectors[layer.bias_index] = (basis.for_bias,)
                eigenvalues[layer.bias_index] = correction.bias_corrections[layer.name]
        for entry in self.layout.diagonal_modules:
            for index, squares in zip(entry.indices, diagonal.squares[entry.name]):
                eigenvalues[index] = squares  # an exact block's: set by compute
        tokens = round(float(totals.examples)) if totals.token_level else None
        return EKFACFactors(
            eigenvectors,
            eigenvalues,
            totals.loss,
            tokens,
            batch_dims=self.sweep.batch_dims,
            sketches=self._sketches(correction, eigenvalues),
            rank=self.options.correction_rank,
        )

    def _sketches(
        self, correction: CorrectionAccumulator, eigenvalues: list[Tensor]
    ) -> dict[int, CurvatureSketch]:
        """Block index to its sketch over every example, in the block's layout."""
        sketches = {}
        for layer in self.layout.kronecker_layers:
            weight, bias = correction.sketches.get(layer.name, (None, None))
            if weight is not None:
                weight = weight.scaled_to_all()
                sketches[layer.weight_index] = (
                    weight.transposed() if layer.transposed else weight
                )
            if bias is not None:
                sketches[layer.bias_index] = bias.scaled_to_all()
        return {
            index: sketch.with_diagonal(eigenvalues[index])
            for index, sketch in sketches.items()
        }


def fast_ekfac(
    model: nn.Module,
    layout: ParameterLayout,
    batches: Iterable[tuple[Any, Tensor]],
    likelihood: Likelihood | str,
    num_data: int,
    options: EKFACOptions,
    *,
    eigenbasis: list[tuple[Tensor, ...]] | None = None,
    progress_bar: bool = False,
    ranks: LocalRanks | None = None,
) -> EKFACFactors:
    """EKFAC factors with our engine, in the scale of the summed torch loss.

    Args:
        model: The network.
        layout: The parameter layout of the posterior.
        batches: Re-iterable ``(X, y)`` pairs.
        likelihood: ``"classification"`` or ``"regression"``.
        num_data: Number of training points.
        options: How to compute it.
        eigenbasis: Fixed eigenbasis per block (online fitting): skips the factor
            pass.
        progress_bar: Show a progress bar over each pass.
        ranks: The ranks of a data-parallel fit (default: one process).

    Returns:
        Eigenvectors, corrected eigenvalues and the summed loss (over all ranks).
    """
    engine = FastEKFAC(
        model, layout, likelihood, options, num_data, progress_bar, ranks
    )
    return engine.compute(batches, eigenbasis)
