"""Reference models and the MAP training loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ekfac_laplace.evaluation.models import build_model, cnn, map_loss, mlp, train_map


def test_mlp_and_cnn_shapes():
    assert mlp((1, 8, 8), 10, hidden=(5,))(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert mlp((2,), 1)(torch.zeros(4, 2)).shape == (4, 1)
    net = cnn((1, 8, 8), 10, channels=(4, 6), hidden=7)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert [type(m) for m in net if isinstance(m, nn.Conv2d | nn.Linear)] == [
        nn.Conv2d,
        nn.Conv2d,
        nn.Linear,
        nn.Linear,
    ]


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    first = build_model("mlp", (2,), 3, seed=1)
    assert torch.rand(1) == expected
    second = build_model("mlp", (2,), 3, seed=1)
    other = build_model("mlp", (2,), 3, seed=2)
    for a, b, c in zip(first.parameters(), second.parameters(), other.parameters()):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_train_map_lowers_the_loss_for_both_likelihoods():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(64, 2, generator=generator)
    for likelihood, y in (
        ("classification", (X[:, 0] > 0).long()),
        ("regression", X[:, :1] * 2.0),
    ):
        model = build_model("mlp", (2,), 2 if likelihood == "classification" else 1)
        loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True)
        before = map_loss(model(X), y, likelihood).item()
        train_map(model, loader, likelihood, epochs=30)
        after = map_loss(model(X), y, likelihood).item()
        assert after < 0.5 * before
        assert not model.training


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mlp((0, 3), 2), "input_shape must hold positive"),
        (lambda: mlp((3,), 0), "n_outputs and hidden sizes must be positive"),
        (lambda: cnn((8, 8), 2), "cnn needs image inputs"),
        (lambda: cnn((1, 2, 2), 2), "pooling stages need images of at least 4"),
        (lambda: build_model("resnet", (2,), 2), "Unknown model 'resnet'"),
        (
            lambda: train_map(mlp((2,), 2), [], "poisson"),
            "Unknown likelihood 'poisson'",
        ),
        (lambda: train_map(mlp((2,), 2), [], "regression", epochs=0), "epochs"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_dropout_adds_dropout_modules_and_keeps_the_initialisation():
    plain = build_model("mlp", (1, 8, 8), 10, seed=3)
    dropped = build_model("mlp", (1, 8, 8), 10, seed=3, dropout=0.2)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    rates = [m.p for m in dropped.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.2, 0.2]
    for p, q in zip(plain.parameters(), dropped.parameters()):
        assert torch.equal(p, q)
    conv = build_model("cnn", (1, 8, 8), 10, dropout=0.1)
    assert sum(isinstance(m, torch.nn.Dropout) for m in conv.modules()) == 2
    assert conv(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="dropout must be in"):
        mlp((2,), 2, dropout=1.0)
