"""What every accumulator of a pass has: the interface and the shared arithmetic.

:class:`PassAccumulator` is what a pass hands a layer's inputs and output gradients
to; :class:`PerExampleGradients` is the compact cache entry of a weight-sharing
layer; :func:`rotate` is the rotation of per-example products that both the
correction and its replay square and sum.
"""

from __future__ import annotations

from torch import Tensor

from ekfac_laplace.layer import KroneckerLayer
from ekfac_laplace.output_curvature import OutputCurvature


class PerExampleGradients:
    """A batch's per-example (pseudo-)gradients of a layer, one per backward pass.

    The compact cache entry of a weight-sharing layer: ``K d_out (d_in + 1)``
    numbers per example instead of the ``S (d_in + K d_out)`` of its inputs and
    output gradients (a convolution's positions ``S`` are many).

    Args:
        weight: ``Σ_s g_{n,k,s} a_{n,s}ᵀ``, shape ``(B, K, d_out, d_in)``, or
            ``None`` without the weight in the posterior.
        bias: ``Σ_s g_{n,k,s}``, shape ``(B, K, d_out)``, or ``None``.
    """

    def __init__(self, weight: Tensor | None, bias: Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def nbytes(self) -> int:
        """Memory held.

        Returns:
            Bytes.
        """
        held = [t for t in (self.weight, self.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


#: A cached first-pass entry of a layer: its inputs and either the stacked output
#: gradients ``(B, K, S, d_out)`` or, for the output layer, the output curvature; or
#: the per-example gradients alone (the compact form of weight-sharing layers).
CacheEntry = tuple[Tensor, Tensor | OutputCurvature] | PerExampleGradients


def per_example_numbers(
    layer: KroneckerLayer, positions: int, d_in: int, passes: int
) -> tuple[int, int]:
    """Numbers per example of a layer's two cache forms: raw and per-example.

    Args:
        layer: The layer.
        positions: Its positions ``S`` sharing the weight.
        d_in: Its input features.
        passes: The backward passes ``K``.

    Returns:
        ``(S (d_in + K d_out), K (d_out d_in [weight] + d_b [bias]))``.
    """
    d_out = layer.out_features
    raw = positions * (d_in + passes * d_out)
    compact = passes * (
        (d_out * d_in if layer.weight_index is not None else 0)
        + (layer.bias_features if layer.bias_index is not None else 0)
    )
    return raw, compact


class PassAccumulator:
    """Receives what one pass over the data sees; the default ignores everything."""

    def plan(
        self,
        inputs: dict[str, Tensor],
        hidden: list[KroneckerLayer],
        passes: int,
        masks: dict[str, Tensor] | None = None,
        curvature: OutputCurvature | None = None,
    ) -> None:
        """Before anything else of a batch.

        Args:
            inputs: Layer name to its inputs ``(B, S, d_in)``.
            hidden: The layers that get output gradients (not the output layer).
            passes: The number ``K`` of backward passes that will follow.
            masks: Layer name to its mask ``(B, S)`` (``1``: token, ``0``:
                padding) for the layers whose inputs include padding.
            curvature: The batch's output curvature (what an output layer's
                cache entry holds).
        """

    def begin(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Before the backward passes of a hidden layer.

        Args:
            layer: The layer.
            a: Its inputs, ``(B, S, d_in)``.
        """

    def gradient(
        self,
        layer: KroneckerLayer,
        a: Tensor,
        g: Tensor | None,
        bias_rows: Tensor | None = None,
    ) -> None:
        """One backward pass of a hidden layer.

        Args:
            layer: The layer.
            a: Its inputs, ``(B, S, d_in)``.
            g: Its output gradients, ``(B, S, d_out)`` (``None`` for a layer with
                only a bias of its own).
            bias_rows: For a bias with a factor of its own, its rows
                ``(B, S_b, d_b)``.
        """

    def end(self, layer: KroneckerLayer, a: Tensor) -> None:
        """After the backward passes of a hidden layer.

        Args:
            layer: The layer.
            a: Its inputs, ``(B, S, d_in)``.
        """

    def output(
        self, layer: KroneckerLayer, a: Tensor, curvature: OutputCurvature
    ) -> None:
        """A layer whose output is the model output (one position).

        Args:
            layer: The layer.
            a: Its inputs, ``(B, 1, d_in)``.
            curvature: The batch's output-space curvature.
        """

    def batch_done(self, batch_size: int) -> None:
        """After a batch.

        Args:
            batch_size: Its number of examples.
        """


def add_to(total: Tensor | None, term: Tensor) -> Tensor:
    """``term`` added to a running ``total`` (``term`` itself where none yet)."""
    return term if total is None else total + term


def rotate(products: Tensor, q_g: Tensor | None, q_a: Tensor | None) -> Tensor:
    """``Q_Gᵀ M Q_A`` of products ``M`` ``(..., d_out, d_in)``.

    A rotation given as ``None`` has been applied already (or is the identity).
    The correction squares the rotated products where they lie, since they are new
    tensors (or the caller's own product): that spares an allocation as large (fits
    of token-level layers ``1.4×`` faster on the CPU, where a new tensor's pages are
    touched for the first time), and lets a sketch read them first.
    """
    if q_g is not None:
        products = q_g.T @ products
    if q_a is not None:
        products = products @ q_a
    return products


def grouped(x: Tensor, groups: int) -> Tensor:
    """``(B, S, G·d)`` as ``(B, S, G, d)``: a grouped layer's groups apart."""
    return x.reshape(*x.shape[:2], groups, -1)
