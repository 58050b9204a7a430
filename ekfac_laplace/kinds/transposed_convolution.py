r"""``nn.ConvTranspose1d``, ``ConvTranspose2d``, ``ConvTranspose3d``, grouped or not.

A transposed convolution is the adjoint of a convolution: input position ``s``
adds ``W[:, :, k] x_s`` to the output at ``s·stride + k·dilation − padding``. Its
weight gradient is therefore a sum over the *input* positions of outer products of
the input with a patch of the output gradient,

$$
    \nabla_{W} \ell = \sum_s x_s\, \mathrm{patch}_s(\nabla_y \ell)^\top ,
$$

the patch taken as a convolution of the same kernel, stride, dilation and padding
would take it from the output. So ``a`` is the input, one row per input position
(``d_in = c_in``), and ``g`` the output gradient's patches (``d_out = c_out·k``);
the weight ``(c_in, c_out, *k)`` flattens to ``Wᵀ`` (``d_in`` first): the block's
eigenbasis is ``Q_A ⊗ Q_G``. The bias adds to every *output* position, so its
gradient is the output gradient summed there, not a sum of ``g``: the bias has its
own factor, from the output gradient one row per output position. ``output_padding``
adds output positions no patch covers beyond the input's; they reach the bias only.
A grouped one (weight ``(c_in, c_out/G, *k)``) maps the ``c_in/G`` channels of each
group to its ``c_out/G``: per group, ``a`` its input channels and ``g`` its
output-gradient patches (both contiguous, channel-major), and factors of its own.
curvlinops does not support it.
"""

from __future__ import annotations

from torch import Tensor, nn

from ekfac_laplace.kinds.base import LayerKind
from ekfac_laplace.kinds.convolution import unfold_patches

TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class TransposedConvolution(LayerKind):
    """A transposed convolution over one, two or three spatial dimensions."""

    name = "transposed_convolution"
    description = "a transposed convolution"
    transposed = True
    separate_bias = True
    base_classes = TRANSPOSED_CONVOLUTIONS

    def claims(
        self, model: nn.Module, module_name: str, module: nn.Module, param_name: str
    ) -> str | None:
        """Any ``nn.ConvTranspose{1,2,3}d``, under its own name."""
        return module_name if isinstance(module, TRANSPOSED_CONVOLUTIONS) else None

    def groups(self, module: nn.Module) -> int:
        """``module.groups``."""
        return module.groups

    def as_groups(self, weight_like: Tensor, groups: int) -> Tensor:
        """Per group, ``(c_in/G, c_out/G·k)`` flattened and transposed."""
        return weight_like.reshape(groups, weight_like.shape[0] // groups, -1).mT

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """One row per input position: its channels."""
        return x.flatten(start_dim=2).transpose(1, 2)

    def output_gradients(self, module: nn.Module, gradient: Tensor) -> Tensor:
        """The output gradient's patch of each input position, ``c_out·k`` wide."""
        windows = [
            (size + 2 * p - d * (k - 1) - extra - 1) // s + 1
            for size, p, d, k, extra, s in zip(
                gradient.shape[2:],
                module.padding,
                module.dilation,
                module.kernel_size,
                module.output_padding,
                module.stride,
            )
        ]
        return unfold_patches(
            gradient,
            module.kernel_size,
            module.stride,
            module.dilation,
            [(p, p) for p in module.padding],
            windows=windows,
        )

    def bias_gradients(self, module: nn.Module, gradient: Tensor) -> Tensor:
        """The output gradient, one row per output position."""
        return gradient.flatten(start_dim=2).transpose(1, 2)

    def as_matrix(self, weight_like: Tensor) -> Tensor:
        """``(c_in, c_out·k)`` flattened, transposed to ``(c_out·k, c_in)``."""
        return weight_like.reshape(weight_like.shape[0], -1).T

    def bias_features(self, module: nn.Module) -> int:
        """``c_out``."""
        return module.out_channels
