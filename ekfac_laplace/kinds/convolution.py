"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``, grouped or not.

``a`` are the input's patches: one row per output position, the input channels
times the kernel's positions (``c_in·k``, channel-major, as the weight
``(c_out, c_in, *k)`` flattens), for every stride, dilation, padding (numbers,
``"same"``, ``"valid"``) and padding mode (zeros, reflect, replicate, circular: the
input is padded as the convolution pads it, then unfolded); ``g`` is the output
gradient, one row per output position. The bias shares ``G``. A grouped
convolution (``groups > 1``, depthwise) applies a weight ``(c_out/G, c_in/G·k)``
per group to its channels: the groups are side by side in ``a`` and ``g`` (the
unfold is channel-major), and each gets its own factors, so its block is
``⊕_g Q_G^g ⊗ Q_A^g``. curvlinops supports ``nn.Conv2d`` with ``groups=1`` and zero
padding of numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from ekfac_laplace.kinds.base import LayerKind

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def padding_pairs(module: nn.Module) -> list[tuple[int, int]]:
    """The padding ``(before, after)`` of each spatial dimension, as torch pads.

    Args:
        module: A convolution (numbers, ``"same"`` or ``"valid"``).

    Returns:
        One pair per spatial dimension; ``"same"`` puts the odd one after.
    """
    padding = module.padding
    if padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if padding == "same":
        pairs = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))
        return pairs
    return [(p, p) for p in padding]


def unfold_patches(
    x: Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    pads: Sequence[tuple[int, int]],
    mode: str = "zeros",
    windows: Sequence[int] | None = None,
) -> Tensor:
    """The patches of ``x`` ``(B, C, *spatial)`` a convolution takes, ``(B, S, C·k)``.

    ``F.unfold`` for one and two spatial dimensions with symmetric zero padding,
    else the padded input unfolded one dimension at a time.

    Args:
        x: The input.
        kernel: Kernel size per spatial dimension.
        stride: Stride per spatial dimension.
        dilation: Dilation per spatial dimension.
        pads: ``(before, after)`` padding per spatial dimension.
        mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        windows: Keep only the first this many positions per dimension.

    Returns:
        One row per position (row-major over the spatial dimensions), the
        channels times the kernel's positions, channel-major.
    """
    dims = len(kernel)
    symmetric = all(before == after for before, after in pads)
    if windows is None and dims <= 2 and mode == "zeros" and symmetric:
        if dims == 1:  # a row of height 1
            x = x.unsqueeze(2)
            kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
            pads = [(0, 0), *pads]
        patches = F.unfold(
            x,
            tuple(kernel),
            dilation=tuple(dilation),
            padding=tuple(before for before, _ in pads),
            stride=tuple(stride),
        )
        return patches.transpose(1, 2)
    if any(before or after for before, after in pads):
        flat = [p for pair in reversed(pads) for p in pair]  # last dimension first
        x = F.pad(x, flat, mode="constant" if mode == "zeros" else mode)
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
        if windows is not None:
            x = x.narrow(2 + i, 0, windows[i])
    B, C = x.shape[:2]
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    positions = _product(x.shape[2 : 2 + dims])
    return x.permute(order).reshape(B, positions, C * _product(kernel))


def _product(values: Sequence[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


class Convolution(LayerKind):
    """A convolution over one, two or three spatial dimensions."""

    name = "convolution"
    description = "a convolution"
    base_classes = CONVOLUTIONS

    def claims(
        self, model: nn.Module, module_name: str, module: nn.Module, param_name: str
    ) -> str | None:
        """Any ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``, under its own name."""
        return module_name if isinstance(module, CONVOLUTIONS) else None

    def groups(self, module: nn.Module) -> int:
        """``module.groups``."""
        return module.groups

    def curvlinops_supports(self, module: nn.Module) -> bool:
        """The KFAC of curvlinops handles ``nn.Conv2d`` with zero padding of numbers."""
        return (
            isinstance(module, nn.Conv2d)
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """The input's patches, padded as the convolution pads it."""
        return unfold_patches(
            x,
            module.kernel_size,
            module.stride,
            module.dilation,
            padding_pairs(module),
            module.padding_mode,
        )

    def output_gradients(self, module: nn.Module, gradient: Tensor) -> Tensor:
        """One row per output position."""
        return gradient.flatten(start_dim=2).transpose(1, 2)
