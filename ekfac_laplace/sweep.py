"""One batch of the fit: a forward pass and ``K`` backward passes.

A :class:`Sweep` installs the hooks and runs the forward pass
(:class:`~ekfac_laplace.capture.ForwardCapture`), then the ``K`` backward passes
through :class:`~ekfac_laplace.driver.BackwardPasses`, each layer's inputs and
gradients handed to an accumulator one backward pass at a time (no more than one
``(B, S, d_out)`` gradient per layer is held).

A dict batch's ``attention_mask`` marks padding positions: they are left out of
the input factors, so that padding contributes nothing.

A network that folds another dimension into its batch before a layer (a reward
model's pair of completions, ``x.reshape(-1, d)``) gives that layer ``B·m`` rows; each
example's ``m`` consecutive rows become positions sharing the weight
(:func:`~ekfac_laplace.layer.group_rows`), so that the correction uses the
per-example gradients. The first batch checks that the rows are consecutive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from laplace.utils.enums import Likelihood
from torch import Tensor, nn

from ekfac_laplace._compat import tensor_version
from ekfac_laplace.accumulators import (
    DiagonalSquares,
    PassAccumulator,
)
from ekfac_laplace.batches import token_rows
from ekfac_laplace.capture import ForwardCapture, group_rows
from ekfac_laplace.driver import BackwardPasses
from ekfac_laplace.factors import accumulation_dtype
from ekfac_laplace.layer import KroneckerLayer
from ekfac_laplace.layout import DiagonalModule, ParameterLayout
from ekfac_laplace.output_curvature import OutputCurvature
from ekfac_laplace.probes import locate_batches, route_rows

CurvatureFunction = Callable[[Tensor, Tensor], OutputCurvature]


class Sweep:
    """A forward pass and ``K`` backward passes on one batch.

    Token-level outputs ``(B, T, C)`` (a language model) with labels ``(B, T)``
    make each token whose label is not ``-100`` an example: its outputs' curvature
    vectors are back-propagated one token position at a time (``T·K`` backward
    passes), so that each pass gives every sequence's gradient for one token, as
    the per-example squares of the correction need. With ``per_sequence`` (the
    Monte-Carlo Fisher's sampled labels, zero-mean) the tokens of a sequence share
    one pass, ``K`` passes in all: the sequence is the example of the correction.

    Args:
        model: The network.
        layout: Its parameter layout.
        likelihood: ``"classification"`` or ``"regression"``.
        per_sequence: Back-propagate a token-level batch's vectors once per
            sequence (``mc_per_sequence``).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParameterLayout,
        likelihood: Likelihood | str = Likelihood.CLASSIFICATION,
        per_sequence: bool = False,
    ) -> None:
        self.model = model
        self.layout = layout
        self.likelihood = likelihood
        self.per_sequence = per_sequence
        self.batch_dims: dict[str, int] | None = None  # found on the first batch
        #: Whether a batch showed rows routed to some layers (a mixture of
        #: experts): every later batch then finds each row's example too.
        self.routing = False

    def run(
        self,
        X: Any,
        y: Tensor,
        curvature_fn: CurvatureFunction,
        accumulator: PassAccumulator,
        diagonal: DiagonalSquares | None = None,
        layers: list[KroneckerLayer] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run one batch through the network and the accumulators.

        Args:
            X: The model input.
            y: The targets.
            curvature_fn: Builds the batch's output curvature from ``(f, y)``.
            accumulator: Receives each layer's inputs and output gradients.
            diagonal: Receives the diagonal modules' gradients, and (its
                ``dense``) the exact blocks' (first pass only).
            layers: The Kronecker layers to visit (default: all); the backward
                passes go only as deep as these.

        Returns:
            The examples' outputs (detached) and targets: ``f`` ``(B, C)`` and
            ``y``, or for token-level outputs the counted tokens' rows.

        Raises:
            ValueError: For outputs that are not ``(batch, outputs)`` or
                ``(batch, tokens, classes)``, a reused module, or a diagonal module
                whose examples cannot be told apart.
        """
        dense = None if diagonal is None else diagonal.dense
        if not self.layout.has_diagonal and not dense:
            diagonal = None
        layers = self.layout.layers if layers is None else layers
        capture = ForwardCapture(
            self.layout,
            diagonal=diagonal is not None,
            batch=len(y),
            batch_dims=self.batch_dims,
        )
        with torch.enable_grad():
            f = self._forward(X, capture)
            counted, schedule = None, None
            dtype = accumulation_dtype(f.dtype)  # float32 for half precision
            if f.ndim == 3:
                f_rows, y, counted = token_rows(f, y, self.likelihood)
                schedule = token_schedule(counted)
                if not schedule:  # every label -100: no example, nothing to add
                    return f_rows.detach().to(dtype), y
            else:
                f_rows = f
            curvature = curvature_fn(f_rows.to(dtype), y)
            hidden = self._hidden_layers(capture, f, layers, every=counted is not None)
            batch = f.shape[0]
            if self.batch_dims is None and batch > 1:
                self._locate_batches(f, hidden, capture)
            positions = {  # the raw inputs are released as they are unfolded
                layer.name: group_rows(
                    layer.inputs(capture.take_input(layer.name)), batch, layer.name
                ).to(dtype)
                for layer in layers
            }
            backward = bool(hidden) or (
                diagonal is not None and self.layout.has_diagonal
            )
            vectors = curvature.vectors() if backward else None
            passes = None
            if vectors is not None and self.per_sequence and schedule is not None:
                passes = _Passes(f_rows, vectors, None)  # all tokens in each pass
            elif vectors is not None:
                passes = _Passes(f, vectors, schedule)
            accumulator.plan(
                positions,
                hidden,
                len(passes or ()),
                _padding(
                    X,
                    {n: a for n, a in positions.items() if n not in capture.routes},
                ),
                curvature=curvature,
            )
            for layer in layers:
                a = positions[layer.name]
                if layer in hidden:
                    if layer.has_kronecker:
                        accumulator.begin(layer, a)
                    continue
                if layer.has_kronecker:
                    accumulator.output(layer, a, curvature)
                if dense and layer in self.layout.dense_layers:
                    dense.output(layer, a, curvature)
            if passes is not None:
                self._backward_passes(
                    f, passes, hidden, capture, positions, accumulator, diagonal
                )
        return f_rows.detach().to(dtype), y

    def _forward(self, X: Any, capture: ForwardCapture) -> Tensor:
        """The forward pass with the layout's modules captured."""
        with capture:
            f = self.model(X)
        capture.settle_calls(f)
        self.routing = route_rows(
            capture, f, self.layout.backprop_targets(), always=self.routing
        )
        if f.ndim not in (2, 3):
            raise ValueError(
                f"EKFAC needs model outputs of shape (batch, outputs) or (batch, "
                f"tokens, classes), got {tuple(f.shape)}; flatten other dimensions "
                "into the batch dimension."
            )
        return f

    def _locate_batches(
        self, f: Tensor, hidden: list[KroneckerLayer], capture: ForwardCapture
    ) -> None:
        """On the first batch with several examples: where each module's batch is.

        Two backward passes, from the outputs of examples 0 and 1
        (:func:`~ekfac_laplace.probes.locate_batches`); they also
        refuse rows folded into the batch out of order and coupled examples.
        """
        targets = self._targets(hidden, capture.diagonal)
        if targets:
            locate_batches(capture, f, targets, check=True)
        self.batch_dims = dict(capture.batch_dims)

    def _targets(
        self,
        hidden: list[KroneckerLayer],
        diagonal: bool,
        capture: ForwardCapture | None = None,
    ) -> list[Tensor]:
        """Where the backward passes stop: per hidden layer, then diagonal module.

        A diagonal module gets one of its parameters. A hidden layer gets one of
        its parameters too, or, given the ``capture``, its output tensor where it
        can: back-propagating to the output spares autograd the parameter's
        gradient (for a convolution the bias gradient alone costs as much as its
        input gradient on the CPU, and the deepest one then runs no convolution
        backward at all). A layer applied once (not the attention projections,
        several calls each) whose output has not been changed in place since gets
        its output.
        """
        targets = []
        for layer in hidden:
            output, version = (None, None)
            if capture is not None:
                output, version = capture.outputs[layer.name]
            if (
                not layer.kind.applied_by_parent  # one call: one output tensor
                and isinstance(output, Tensor)
                and output.requires_grad
                and tensor_version(output) == version
            ):
                targets.append(output)
            else:
                targets.append(layer.target)
        if diagonal:
            targets += [entry.target for entry in self.layout.diagonal_modules]
        return targets

    def _hidden_layers(
        self,
        capture: ForwardCapture,
        f: Tensor,
        layers: list[KroneckerLayer],
        every: bool = False,
    ) -> list[KroneckerLayer]:
        """The layers that need backward passes: all but an output layer.

        A layer whose output *is* the model output ``(B, C)``, unchanged in place
        since, gets its output gradients in closed form from the curvature (not for
        token-level outputs, ``every``).
        """
        hidden = []
        for layer in layers:
            capture.check_ran(layer)
            output, version = capture.outputs[layer.name]
            closed_form = (
                output is f
                and version == tensor_version(f)
                and not layer.kind.separate_bias
                and layer.groups == 1
            )
            if every or not closed_form:
                hidden.append(layer)
        return hidden

    def _backward_passes(
        self,
        f: Tensor,
        passes: _Passes,
        hidden: list[KroneckerLayer],
        capture: ForwardCapture,
        positions: dict[str, Tensor],
        accumulator: PassAccumulator,
        diagonal: DiagonalSquares | None,
    ) -> None:
        """Back-propagate each ``v_k``, the gradients to the accumulators.

        Through :class:`~ekfac_laplace.driver.BackwardPasses`: each layer's output
        gradient reaches the accumulators as autograd computes it. A pass that
        does not reach a layer at all (autograd gives it no gradient, e.g. a
        regression output of another head) adds nothing to its sums, as a zero
        gradient would. A layer that no pass of a batch reaches is refused.
        """
        modules = self.layout.diagonal_modules if diagonal else []
        targets = self._targets(hidden, diagonal is not None, capture)
        receiver = _SweepReceiver(
            self.layout, positions, f.shape[0], accumulator, diagonal, capture
        )
        report = BackwardPasses(capture, hidden, modules, targets).run(
            len(passes), passes.output, receiver
        )
        unreached = [  # (a layer called on no row has nothing to reach)
            layer.name
            for layer in hidden
            if layer.name not in report.reached and positions[layer.name].shape[1]
        ]
        if unreached:
            raise ValueError(
                f"No backward pass of this batch reaches layer(s) {unreached}: the "
                "model's outputs do not depend on them, so their curvature is zero "
                "and EKFAC has no gradient factor for them. Leave their parameters "
                "out of the posterior (requires_grad=False, or a subset of the "
                "weights)."
            )
        for layer in hidden:
            if layer.has_kronecker:
                accumulator.end(layer, positions[layer.name])


class _SweepReceiver:
    """The fit's :class:`~ekfac_laplace.driver.PassReceiver`: gradients to sums.

    A layer's output gradient goes to the pass's accumulator (factors or
    corrections) and, for a layer with an exact block, to the exact blocks; a
    diagonal module's to the diagonal squares (and its exact blocks).
    """

    def __init__(
        self,
        layout: ParameterLayout,
        positions: dict[str, Tensor],
        batch: int,
        accumulator: PassAccumulator,
        diagonal: DiagonalSquares | None,
        capture: ForwardCapture,
    ) -> None:
        self.positions, self.batch = positions, batch
        self.accumulator, self.diagonal, self.capture = accumulator, diagonal, capture
        self.dense = None if diagonal is None else diagonal.dense
        self.exact = (
            {layer.name for layer in layout.dense_layers} if self.dense else set()
        )

    def layer_gradient(self, layer: KroneckerLayer, gradient: Tensor, k: int) -> None:
        """Rows of the gradient to the accumulator and the exact blocks."""
        exact = layer.name in self.exact
        a, name = self.positions[layer.name], layer.name
        g = bias_rows = None
        if layer.shares_weight or (exact and layer.dense_needs_rows):
            g = group_rows(layer.output_gradients(gradient), self.batch, name)
            g = g.to(a.dtype)
        if layer.separate_bias or (exact and layer.dense_needs_bias_rows):
            bias_rows = group_rows(layer.bias_gradients(gradient), self.batch, name)
            bias_rows = bias_rows.to(a.dtype)
        if layer.has_kronecker:
            self.accumulator.gradient(
                layer,
                a,
                g if layer.shares_weight else None,
                bias_rows if layer.separate_bias else None,
            )
        if exact:
            self.dense.gradient(layer, a, g, bias_rows)

    def module_gradients(self, entry: DiagonalModule, gradients: Any, k: int) -> None:
        """A diagonal module's gradients to the diagonal squares."""
        call = self.capture.calls.get(entry.name)
        self.diagonal.add(entry, call, gradients, self.batch)

    def end_pass(self, k: int) -> None:
        """A tied parameter's uses are summed per pass: square them now."""
        if self.diagonal is not None:
            self.diagonal.end_pass()


class _Passes:
    """The backward passes of a batch: ``⟨f, v_k⟩`` for each curvature vector.

    For outputs ``(B, C)`` pass ``k`` back-propagates ``Σ_n ⟨f_n, v_{n,k}⟩`` (and
    so for the counted tokens' rows ``(R, C)`` of a per-sequence fit). For
    token-level outputs ``(B, T, C)`` the counted tokens are the examples: pass
    ``(t, k)`` back-propagates ``Σ_n ⟨f_{n,t}, v_{(n,t),k}⟩`` over the sequences
    whose token ``t`` counts, so that each pass holds one example per sequence.

    Args:
        f: The outputs.
        vectors: The curvature vectors of the examples' rows, ``(R, K, C)``.
        schedule: For token-level outputs, :func:`token_schedule` of the counted
            tokens.
    """

    def __init__(
        self,
        f: Tensor,
        vectors: Tensor,
        schedule: list[tuple[int, Tensor, Tensor]] | None,
    ) -> None:
        self.f, self.vectors = f, vectors
        self.per_token = schedule or []
        self.tokens = schedule is not None

    def __len__(self) -> int:
        K = self.vectors.shape[1]
        return K * len(self.per_token) if self.tokens else K

    def output(self, index: int) -> Tensor:
        """The scalar whose backward pass is pass ``index``."""
        K = self.vectors.shape[1]
        if not self.tokens:
            return (self.f * self.vectors[:, index]).sum()
        t, sequences, rows = self.per_token[index // K]
        return (self.f[sequences, t] * self.vectors[rows, index % K]).sum()


def token_schedule(counted: Tensor) -> list[tuple[int, Tensor, Tensor]]:
    """Per token position with a counted token: the sequences and rows it has.

    Args:
        counted: The mask of counted tokens ``(B, T)``.

    Returns:
        ``(t, sequences, rows)`` per position ``t`` (empty if no token counts):
        the sequences whose token ``t`` counts and their rows among the counted
        tokens (row-major order).
    """
    sequences, tokens = counted.nonzero(as_tuple=True)
    schedule = []
    for t in torch.unique(tokens).tolist():
        rows = (tokens == t).nonzero(as_tuple=True)[0]
        schedule.append((t, sequences[rows], rows))
    return schedule


def _padding(X: Any, positions: dict[str, Tensor]) -> dict[str, Tensor]:
    """Which positions of each layer are tokens, from the batch's attention mask.

    A dict batch's ``attention_mask`` (``1``: token, ``0``: padding), flattened to
    ``(B, T)``, marks the positions of every layer that sees ``T`` positions per
    example (after grouping folded rows). Padding positions are left out of the
    Kronecker factors ``A`` and ``G``, as without the padding. Only the eigenbasis
    depends on the factors: the corrected eigenvalues use every position, so they
    stay exact (in that basis) even for a model that does not mask its padding;
    one that does gives them zero output gradients, and so they add nothing there
    either.

    Args:
        X: The model input.
        positions: Layer name to its inputs ``(B, S, d_in)``.

    Returns:
        Layer name to its mask ``(B, S)`` (in the inputs' dtype), for the layers
        with padding.
    """
    mask = X.get("attention_mask") if isinstance(X, Mapping) else None
    if not isinstance(mask, Tensor) or mask.ndim < 2:  # (no host sync on its values)
        return {}
    flat = mask.reshape(mask.shape[0], -1)
    return {
        name: flat.to(a.dtype)
        for name, a in positions.items()
        if flat.shape == a.shape[:2]
    }
