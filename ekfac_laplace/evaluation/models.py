"""Reference networks for the bundled data and a MAP training loop.

The command line (``ekfac-laplace``) and the examples train these models to a MAP
estimate before fitting Laplace approximations around it. The MAP objective is the
likelihood's loss plus the weight decay of the optimiser, which corresponds to a
Gaussian prior; the Laplace prior precision is tuned afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ekfac_laplace.factors import LIKELIHOODS

MODELS = ("mlp", "cnn")


def mlp(
    input_shape: Sequence[int],
    n_outputs: int,
    hidden: Sequence[int] = (64, 64),
    activation: type[nn.Module] = nn.Tanh,
    dropout: float = 0.0,
) -> nn.Sequential:
    """A fully connected network that flattens its input.

    Args:
        input_shape: Shape of one input, e.g. ``(1, 8, 8)`` or ``(2,)``.
        n_outputs: Number of classes or regression outputs.
        hidden: Widths of the hidden layers.
        activation: Activation module class between the linear layers.
        dropout: Dropout rate after each hidden layer (0: no dropout modules).

    Returns:
        ``Flatten -> (Linear -> activation [-> Dropout])* -> Linear``.

    Raises:
        ValueError: If a size is not positive or the rate is not in ``[0, 1)``.
    """
    _check_sizes(input_shape, n_outputs, hidden)
    _check_dropout(dropout)
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), activation()]
        layers += [nn.Dropout(dropout)] if dropout else []
        width = size
    layers.append(nn.Linear(width, n_outputs))
    return nn.Sequential(*layers)


def cnn(
    input_shape: Sequence[int],
    n_outputs: int,
    channels: Sequence[int] = (16, 32),
    hidden: int = 64,
    dropout: float = 0.0,
) -> nn.Sequential:
    """A small convolutional network for images.

    Each stage is a 3×3 convolution (padding 1), ReLU and 2×2 max pooling; a hidden
    linear layer and the output layer follow.

    Args:
        input_shape: ``(channels, height, width)`` of one image.
        n_outputs: Number of classes.
        channels: Output channels of the convolution stages.
        hidden: Width of the hidden linear layer.
        dropout: Dropout rate before the hidden and the output layer (0: none).

    Returns:
        The network.

    Raises:
        ValueError: If the input is not an image shape or too small for the stages,
            or the rate is not in ``[0, 1)``.
    """
    if len(input_shape) != 3:
        raise ValueError(
            f"cnn needs image inputs of shape (channels, height, width), got "
            f"{tuple(input_shape)}; use mlp for vector inputs."
        )
    _check_sizes(input_shape, n_outputs, (*channels, hidden))
    _check_dropout(dropout)
    in_channels, height, width = input_shape
    if min(height, width) < 2 ** len(channels):
        raise ValueError(
            f"{len(channels)} pooling stages need images of at least "
            f"{2 ** len(channels)} pixels per side, got {height}×{width}."
        )
    layers: list[nn.Module] = []
    for size in channels:
        layers += [
            nn.Conv2d(in_channels, size, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        in_channels, height, width = size, height // 2, width // 2

    def drop() -> list[nn.Module]:
        return [nn.Dropout(dropout)] if dropout else []

    layers += [
        nn.Flatten(),
        *drop(),
        nn.Linear(in_channels * height * width, hidden),
        nn.ReLU(),
        *drop(),
        nn.Linear(hidden, n_outputs),
    ]
    return nn.Sequential(*layers)


def build_model(
    name: str,
    input_shape: Sequence[int],
    n_outputs: int,
    *,
    seed: int = 0,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Build one of :data:`MODELS` with a seeded initialisation.

    Args:
        name: ``"mlp"`` or ``"cnn"``.
        input_shape: Shape of one input.
        n_outputs: Number of classes or regression outputs.
        seed: Seed of the initial weights.
        dropout: Dropout rate (for MC dropout); 0 adds no dropout modules.

    Returns:
        The freshly initialised network.

    Raises:
        ValueError: For an unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of {MODELS}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            return mlp(input_shape, n_outputs, dropout=dropout)
        return cnn(input_shape, n_outputs, dropout=dropout)


def train_map(
    model: nn.Module,
    loader: DataLoader,
    likelihood: str,
    *,
    epochs: int = 50,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress_bar: bool = False,
) -> nn.Module:
    """Train ``model`` to a MAP estimate with Adam.

    The loss is the mean cross-entropy (classification) or mean squared error
    (regression) plus the optimiser's weight decay.

    Args:
        model: The network; trained in place and returned in eval mode.
        loader: Training batches ``(X, y)``; shuffle it for stochastic training.
        likelihood: ``"classification"`` or ``"regression"``.
        epochs: Passes over the data.
        lr: Adam learning rate.
        weight_decay: L2 penalty (a Gaussian prior on the weights).
        seed: Seed of the data order (for shuffling loaders) and any randomness.
        progress_bar: Show a tqdm bar over the epochs.

    Returns:
        ``model`` in eval mode.

    Raises:
        ValueError: For an unknown likelihood or a non-positive number of epochs.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"Unknown likelihood {likelihood!r}; choose one of "
            f"{tuple(member.value for member in LIKELIHOODS)}."
        )
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}.")
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in tqdm(range(epochs), desc="Training MAP", disable=not progress_bar):
        for X, y in loader:
            optimizer.zero_grad()
            map_loss(model(X), y, likelihood).backward()
            optimizer.step()
    return model.eval()


def map_loss(output: Tensor, target: Tensor, likelihood: str) -> Tensor:
    """Mean training loss of one batch.

    Args:
        output: Network outputs, shape ``(B, C)`` or ``(B, K)``.
        target: Class indices ``(B,)`` or regression targets ``(B, K)``.
        likelihood: ``"classification"`` or ``"regression"``.

    Returns:
        Mean cross-entropy or mean squared error.
    """
    if likelihood == "classification":
        return nn.functional.cross_entropy(output, target)
    return nn.functional.mse_loss(output, target.reshape(output.shape))


def _check_sizes(
    input_shape: Sequence[int], n_outputs: int, hidden: Sequence[int]
) -> None:
    sizes = {"input_shape": tuple(input_shape), "hidden": tuple(hidden)}
    if not input_shape or any(size < 1 for size in input_shape):
        raise ValueError(f"input_shape must hold positive sizes, got {sizes}.")
    if n_outputs < 1 or any(size < 1 for size in hidden):
        raise ValueError(
            f"n_outputs and hidden sizes must be positive, got n_outputs="
            f"{n_outputs} and hidden={tuple(hidden)}."
        )


def _check_dropout(dropout: float) -> None:
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
