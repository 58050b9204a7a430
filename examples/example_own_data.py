"""Your own classifier and regression model: evaluate Laplace against its peers.

The recipe for a model and data of your own, in Python and on the command line:

1. loaders for training, validation and test data (an OOD set and shifted test sets
   are optional);
2. your network, trained your way (here a plain Adam loop);
3. :func:`ekfac_laplace.compare` with the candidates you want: the MAP, its
   temperature-scaled peer, Laplace at the default prior (the widest prior within
   0.005 nats of the best validation NLL) and at the marginal-likelihood prior
   (``@marglik``);
4. for the command line, :func:`~ekfac_laplace.evaluation.user_inputs.save_data_file`
   writes the tensors, and ``--model this_file.py:build_classifier`` builds the
   network.

The classifier is an MLP on scikit-learn's bundled breast-cancer data (569 tumours,
30 features, 2 classes), the regression model an MLP on its diabetes data (442
patients, 10 features); both standardised with training statistics.

Run: ``python examples/example_own_data.py [--out DIR]`` (about 15 seconds on 2 CPU
cores); it prints both tables and the command line, and writes
``example-output/own_data/breast_cancer.pt``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import ekfac_laplace  # noqa: F401  (first: registers hessian_structure="ekfac")

# isort: split
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ekfac_laplace.evaluation import EvaluationSettings, compare
from ekfac_laplace.evaluation.user_inputs import save_data_file

CANDIDATES = ("map", "map_ts", "ll_ekfac", "all_ekfac", "all_ekfac@marglik")


def build_classifier(
    input_shape: tuple[int, ...], n_outputs: int, dropout: float = 0.0
) -> nn.Module:
    """The network, as the command line calls it (``--model file.py:function``)."""
    layers = [nn.Linear(input_shape[0], 32), nn.Tanh()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(32, n_outputs))


def splits(inputs, targets, seed: int, classification: bool):
    """Train / validation / test tensors (60 / 20 / 20), standardised on train."""
    stratify = targets if classification else None
    rest_x, test_x, rest_y, test_y = train_test_split(
        inputs, targets, test_size=0.2, random_state=seed, stratify=stratify
    )
    stratify = rest_y if classification else None
    train_x, val_x, train_y, val_y = train_test_split(
        rest_x, rest_y, test_size=0.25, random_state=seed, stratify=stratify
    )
    mean, std = train_x.mean(0), train_x.std(0)
    target_type = torch.long if classification else torch.float32

    def pair(x, y):
        x = torch.tensor((x - mean) / std, dtype=torch.float32)
        y = torch.tensor(y, dtype=target_type)
        return x, y if classification else y.reshape(-1, 1)

    return pair(train_x, train_y), pair(val_x, val_y), pair(test_x, test_y)


def train(model: nn.Module, data, loss, epochs: int, seed: int) -> nn.Module:
    """Your own training loop; here Adam with a little weight decay."""
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(*data), batch_size=32, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss(model(x), y).backward()
            optimizer.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("example-output") / "own_data")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    settings = EvaluationSettings(seed=args.seed)  # the default prior rule

    # A classifier: loaders, your network trained your way, then compare.
    cancer = load_breast_cancer()
    train_set, val_set, test_set = splits(
        cancer.data, cancer.target, args.seed, classification=True
    )
    torch.manual_seed(args.seed)
    classifier = train(
        build_classifier((30,), 2), train_set, nn.functional.cross_entropy,
        args.epochs, args.seed,
    )  # fmt: skip

    def loader(data):
        return DataLoader(TensorDataset(*data), batch_size=64)

    comparison = compare(
        classifier,
        "classification",
        loader(train_set),
        loader(test_set),
        val_loader=loader(val_set),
        candidates=CANDIDATES,
        settings=settings,
    )
    print("Breast cancer (your classifier):")
    print(comparison.table(["prior_precision", "val_nll", "test_accuracy", "test_nll",
                            "test_ece", "test_brier"]))  # fmt: skip

    # A regression model: the same, with the MAP's noise estimated from its residuals.
    diabetes = load_diabetes()
    train_reg, val_reg, test_reg = splits(
        diabetes.data, diabetes.target, args.seed, classification=False
    )
    mean, std = train_reg[1].mean(), train_reg[1].std()

    def scaled(data):
        return data[0], (data[1] - mean) / std

    train_reg, val_reg, test_reg = map(scaled, (train_reg, val_reg, test_reg))
    torch.manual_seed(args.seed)
    regressor = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    train(regressor, train_reg, nn.functional.mse_loss, args.epochs, args.seed)
    comparison = compare(
        regressor,
        "regression",
        loader(train_reg),
        loader(test_reg),
        val_loader=loader(val_reg),
        candidates=CANDIDATES,
        settings=settings,
    )
    print("\nDiabetes (your regression model):")
    print(comparison.table(["prior_precision", "val_nll", "test_nll", "test_rmse",
                            "test_coverage_90", "test_calibration_error"]))  # fmt: skip

    # The same classifier on the command line: save the tensors, name the function.
    path = save_data_file(
        args.out / "breast_cancer.pt",
        train=train_set,
        val=val_set,
        test=test_set,
        name="breast cancer",
    )
    print(
        f"\nOn the command line:\n  ekfac-laplace compare --data {path} --model "
        f"{Path(__file__).resolve()}:build_classifier"
    )
    print(f"\nWrote {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
