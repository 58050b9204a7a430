"""Bundled problems: a data set with its loaders and evaluation sets, by name.

The command line and the examples evaluate on the offline data sets of
:mod:`~ekfac_laplace.evaluation.data`; :func:`load_problem` turns a name into the
loaders a comparison needs (digits also gets its out-of-distribution patches and its
rotation / pixel-noise shifts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, TensorDataset

from ekfac_laplace.evaluation import data, shifts
from ekfac_laplace.evaluation.comparison import EvaluationData

DATASETS = ("digits", "noisy-digits", "moons", "toy1d", "diabetes")
#: The data sets of 8×8 images, with OOD patches and rotation / noise shifts.
IMAGE_DATASETS = ("digits", "noisy-digits")


@dataclass
class Problem:
    """A bundled data set ready for evaluation.

    Attributes:
        name: One of :data:`DATASETS`.
        splits: The train / validation / test splits and their description.
        train_loader: Shuffled (seeded) training batches.
        val_loader: Validation batches.
        test_loader: Test batches.
        ood_loader: Out-of-distribution inputs (the image data sets only).
        shift_loaders: ``{kind: {strength: loader}}`` shifted test sets (the image
            data sets only).
    """

    name: str
    splits: data.DataSplits
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    ood_loader: DataLoader | None = None
    shift_loaders: dict[str, dict[float, DataLoader]] = field(default_factory=dict)

    @property
    def likelihood(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return self.splits.likelihood

    def evaluation_data(self) -> EvaluationData:
        """The loaders as a comparison takes them.

        Returns:
            The evaluation data.
        """
        return EvaluationData(
            self.train_loader,
            self.test_loader,
            self.val_loader,
            self.ood_loader,
            self.shift_loaders,
        )


def load_problem(name: str, seed: int = 0, batch_size: int = 64) -> Problem:
    """Load a bundled data set with its evaluation loaders.

    Args:
        name: One of :data:`DATASETS`.
        seed: Seed of the split, the shuffling, the shifts and the OOD set.
        batch_size: Batch size of every loader.

    Returns:
        The problem; the image data sets add the OOD patches and the rotation /
        noise shifts.

    Raises:
        ValueError: For an unknown name.
    """
    loaders = {
        "digits": data.load_digits_splits,
        "noisy-digits": data.load_noisy_digits_splits,
        "moons": data.two_moons,
        "toy1d": data.toy_regression_1d,
        "diabetes": data.load_diabetes_splits,
    }
    if name not in loaders:
        raise ValueError(f"Unknown data set {name!r}; choose one of {DATASETS}.")
    splits = loaders[name](seed=seed)
    ood, shifted = None, {}
    if name in IMAGE_DATASETS:
        ood = shifts.load_ood_patches(seed=seed)
        shifted = {
            kind: {
                strength: shifts.shifted(splits.test, kind, strength, seed=seed)
                for strength in strengths
            }
            for kind, strengths in shifts.SHIFTS.items()
        }
    problem = problem_from_splits(
        name, splits, seed=seed, batch_size=batch_size, ood=ood, shifted=shifted
    )
    return problem


def problem_from_splits(
    name: str,
    splits: data.DataSplits,
    *,
    seed: int = 0,
    batch_size: int = 64,
    ood: TensorDataset | None = None,
    shifted: dict[str, dict[float, TensorDataset]] | None = None,
) -> Problem:
    """A problem from data sets, each with its loader.

    The training loader shuffles, seeded; the others keep their order.

    Args:
        name: The problem's name (output folders, titles).
        splits: Train / validation / test sets.
        seed: Seed of the training loader's shuffling.
        batch_size: Batch size of every loader.
        ood: Out-of-distribution inputs with any labels, or ``None``.
        shifted: ``{kind: {strength: set}}`` shifted test sets, or ``None``.

    Returns:
        The problem.
    """
    generator = torch.Generator().manual_seed(seed)

    def loader(dataset: TensorDataset, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator if shuffle else None,
        )

    return Problem(
        name,
        splits,
        loader(splits.train, shuffle=True),
        loader(splits.val),
        loader(splits.test),
        None if ood is None else loader(ood),
        {
            kind: {strength: loader(d) for strength, d in sets.items()}
            for kind, sets in (shifted or {}).items()
        },
    )
