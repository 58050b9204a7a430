r"""The one driver of backward passes: the fit's, the predictive's, the probes'.

Every backward pass of the package goes through :func:`backward`. The passes of a
batch, ``K`` scalars ``⟨f, v_k⟩`` (the fit: the loss-Hessian root's columns; the
GLM predictive: one output each), go through :class:`BackwardPasses`, which hands
each layer's output gradient to a :class:`PassReceiver` *as autograd computes it*
(a tensor hook on the layer's output; :class:`~ekfac_laplace.capture.ForwardCapture`
calls back), so that no pass holds more than the layer being reduced, and each
diagonal module's output gradients after the pass (its per-example gradients
replay the module on all of them). The receivers are the fit's accumulators
(Kronecker factors, corrected eigenvalues, exact blocks, diagonal squares) and
the predictive's per-layer terms; what a run saw comes back as a value,
:class:`PassReport`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from ekfac_laplace.errors import CaptureError
from ekfac_laplace.layer import KroneckerLayer
from ekfac_laplace.layout import DiagonalModule


def backward(
    output: Tensor, inputs: Sequence[Tensor], retain_graph: bool = False
) -> tuple[Tensor | None, ...]:
    """One backward pass of ``output`` to ``inputs``: the package's only one.

    Args:
        output: A scalar.
        inputs: Where the pass stops (parameters, or layer outputs).
        retain_graph: Keep the graph for another pass.

    Returns:
        The gradients of ``inputs`` (``None`` where the pass does not reach one).
    """
    return torch.autograd.grad(
        output, list(inputs), retain_graph=retain_graph, allow_unused=True
    )


class GradientSource(Protocol):
    """What the driver needs of a forward capture (see ``ForwardCapture``)."""

    receiver: Callable[[str, Tensor], None] | None

    def take_gradients(self, name: str) -> list[Any]:
        """The gradients kept for a module since the last call, removed."""
        ...


class PassReceiver(Protocol):
    """What takes the gradients of the passes (an accumulator, a predictive term)."""

    def layer_gradient(self, layer: KroneckerLayer, gradient: Tensor, k: int) -> None:
        """A Kronecker layer's output gradient (batch first) in pass ``k``."""
        ...

    def module_gradients(self, entry: DiagonalModule, gradients: Any, k: int) -> None:
        """A diagonal module's output gradients (one per output leaf) in pass ``k``."""
        ...

    def end_pass(self, k: int) -> None:
        """Pass ``k`` is over (every gradient of it handed on)."""
        ...


class PassReport(NamedTuple):
    """What a run of passes saw.

    Attributes:
        reached: The Kronecker layers some pass reached.
        passes: The number of passes run.
    """

    reached: frozenset[str]
    passes: int


class BackwardPasses:
    """The backward passes of one batch, their gradients handed to a receiver.

    A layer that a pass does not reach (autograd gives it no gradient) receives
    nothing in that pass, which adds what a zero gradient would. A layer that
    receives more than one gradient in one pass (it ran more than once on the
    graph's path) is refused.

    Args:
        capture: The forward pass's capture.
        layers: The Kronecker layers to hand on (others' gradients are dropped).
        modules: The diagonal modules to hand on.
        targets: Where each pass stops.
    """

    def __init__(
        self,
        capture: GradientSource,
        layers: Sequence[KroneckerLayer],
        modules: Sequence[DiagonalModule],
        targets: Sequence[Tensor],
    ) -> None:
        self.capture = capture
        self.layers = {layer.name: layer for layer in layers}
        self.modules = list(modules)
        self.targets = list(targets)

    def run(
        self,
        count: int,
        output: Callable[[int], Tensor],
        receiver: PassReceiver,
    ) -> PassReport:
        """Run ``count`` passes, pass ``k`` back-propagating ``output(k)``.

        Args:
            count: The number of passes.
            output: The scalar of each pass.
            receiver: Takes the gradients.

        Returns:
            What the passes reached.

        Raises:
            CaptureError: If a layer receives several gradients in one pass.
        """
        arrived: dict[str, int] = {}
        reached: set[str] = set()
        current = [0]

        def hand_on(name: str, gradient: Tensor) -> None:
            layer = self.layers.get(name)
            if layer is None:
                return  # a layer this run does not visit (an output layer's)
            arrived[name] = arrived.get(name, 0) + 1
            if arrived[name] == 1:  # more than one: refused after the pass
                receiver.layer_gradient(layer, gradient, current[0])

        self.capture.receiver = hand_on
        try:
            for k in range(count):
                arrived.clear()
                current[0] = k
                backward(output(k), self.targets, retain_graph=k < count - 1)
                for name in self.layers:  # the attention projections: assembled now
                    for gradient in self.capture.take_gradients(name):
                        hand_on(name, gradient)
                _refuse_repeats(arrived)
                reached.update(arrived)
                for entry in self.modules:
                    for gradients in self.capture.take_gradients(entry.name):
                        receiver.module_gradients(entry, gradients, k)
                receiver.end_pass(k)
        finally:  # the hook holds the receiver: leave no cycle for the collector
            self.capture.receiver = None
        return PassReport(frozenset(reached), count)


def _refuse_repeats(arrived: dict[str, int]) -> None:
    for name, count in arrived.items():
        if count > 1:
            raise CaptureError(
                f"Layer '{name}' received {count} gradients in one backward pass; "
                "EKFAC needs each layer of the posterior to run once per forward "
                "pass on the path to the outputs."
            )
