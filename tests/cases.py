"""Test cases as data: small models, likelihoods and data sets (float64)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ekfac_laplace import EKFACFactors, EKFACOptions, compute_ekfac
from ekfac_laplace.batches import LaplaceBatches
from ekfac_laplace.fitted import FittedLayout


@dataclass
class Case:
    name: str
    build: object  # () -> nn.Module
    likelihood: str
    input_shape: tuple[int, ...]
    n_outputs: int
    n_data: int = 12
    kfac_approx: str = "expand"
    tags: set[str] = field(default_factory=set)

    def make(self, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
        torch.manual_seed(seed)
        model = self.build().to(torch.float64)
        X = torch.randn(self.n_data, *self.input_shape, dtype=torch.float64)
        if self.likelihood == "classification":
            y = torch.randint(0, self.n_outputs, (self.n_data,))
        else:
            y = torch.randn(self.n_data, self.n_outputs, dtype=torch.float64)
        return model, X, y


def loader(X: Tensor, y: Tensor, batch_size: int = 5) -> DataLoader:
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=False)


def fit_factors(
    model: nn.Module,
    params: list[Tensor],
    X: Tensor,
    y: Tensor,
    likelihood: str,
    batch_size: int = 5,
    eigenbasis: list[tuple[Tensor, ...]] | None = None,
    fitted: FittedLayout | None = None,
    **options: object,
) -> EKFACFactors:
    """compute_ekfac over ``(X, y)`` with the options as keywords."""
    return compute_ekfac(
        model,
        params,
        LaplaceBatches(loader(X, y, batch_size)),
        likelihood,
        len(X),
        EKFACOptions(**options),
        eigenbasis=eigenbasis,
        fitted=fitted,
    )


def _mlp(bias: bool = True, n_out: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, n_out, bias=bias)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2),
        nn.Tanh(),
        nn.Conv2d(3, 2, kernel_size=2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    )


CASES = [
    Case("mlp_classification", lambda: _mlp(), "classification", (4,), 3, tags={"mlp"}),
    Case(
        "mlp_nobias_classification",
        lambda: _mlp(bias=False),
        "classification",
        (4,),
        3,
        tags={"mlp"},
    ),
    Case("mlp_regression", lambda: _mlp(n_out=1), "regression", (4,), 1, tags={"mlp"}),
    Case(
        "mlp_regression_multi",
        lambda: _mlp(n_out=2),
        "regression",
        (4,),
        2,
        tags={"mlp"},
    ),
    Case(
        "cnn_classification",
        _cnn,
        "classification",
        (2, 6, 6),
        3,
        n_data=24,
        tags={"cnn"},
    ),
    Case(
        "cnn_classification_reduce",
        _cnn,
        "classification",
        (2, 6, 6),
        3,
        n_data=24,  # > 18 = c_in·kh·kw, so the averaged-patch factor A is full rank
        kfac_approx="reduce",
        tags={"cnn"},
    ),
]

CASE_IDS = [case.name for case in CASES]


def last_layer_params(model: nn.Module) -> list[Tensor]:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return list(last.parameters())


class DictDataset(torch.utils.data.Dataset):
    """Hugging Face-style examples: ``{"input_ids": x, "labels": y}``."""

    def __init__(self, X: Tensor, y: Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.X[index], "labels": self.y[index]}


class RewardModel(nn.Module):
    """laplace-torch's reward model: scores each of a pair, trained as classification.

    Training inputs ``(B, 2, d)`` give the logits ``(B, 2)`` of which completion is
    preferred (the pair folded into the batch of the network, ``x.reshape(-1, d)``);
    test inputs ``(B, d)`` give one reward each, ``(B, 1)``.

    Args:
        interleave: Fold the pair as ``cat([x[:, 0], x[:, 1]])`` instead, so that the
            rows of one example are not consecutive.
    """

    def __init__(self, d: int = 3, hidden: int = 5, interleave: bool = False) -> None:
        super().__init__()
        self.interleave = interleave
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            return self.net(x)
        batch = x.shape[0]
        if self.interleave:
            rewards = self.net(torch.cat([x[:, 0], x[:, 1]]))
            return rewards.reshape(2, batch).T
        return self.net(x.reshape(-1, x.shape[-1])).reshape(batch, 2)


def reward_data(
    n: int = 12, d: int = 3, seed: int = 0
) -> tuple[RewardModel, Tensor, Tensor, Tensor]:
    """A float64 reward model, pairs ``(n, 2, d)``, preferences and test inputs."""
    torch.manual_seed(seed)
    model = RewardModel(d).double()
    pairs = torch.randn(n, 2, d, dtype=torch.float64)
    preferred = torch.randint(0, 2, (n,))
    return model, pairs, preferred, torch.randn(5, d, dtype=torch.float64)
