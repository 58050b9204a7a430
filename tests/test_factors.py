"""EKFAC factors and laplace-torch's likelihood scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace import EKFACDecomposed, EKFACFactors
from ekfac_laplace.factors import likelihood_loss


def test_likelihood_losses_and_their_factors():
    loss, factor = likelihood_loss("classification")
    assert isinstance(loss, nn.CrossEntropyLoss) and loss.reduction == "sum"
    assert factor == 1.0
    loss, factor = likelihood_loss("regression")
    assert isinstance(loss, nn.MSELoss) and loss.reduction == "sum"
    assert factor == 0.5  # ½·MSE-sum is the NLL of a unit Gaussian, up to a constant
    with pytest.raises(ValueError, match="likelihoods 'classification' and"):
        likelihood_loss("reward_modeling")


def test_scaled_factors_clamp_and_share_the_basis():
    q = torch.linalg.qr(torch.randn(2, 2, dtype=torch.float64))[0]
    factors = EKFACFactors(
        [(q,)], [torch.tensor([2.0, -1e-18], dtype=torch.float64)], torch.tensor(3.0)
    )
    half = factors.scaled(0.5)
    assert half.eigenvectors[0][0] is q
    assert torch.equal(
        half.eigenvalues[0], torch.tensor([1.0, 0.0], dtype=torch.float64)
    )
    assert half.loss == 1.5
    decomposed = half.to_decomposed()
    assert isinstance(decomposed, EKFACDecomposed)
    torch.testing.assert_close(
        decomposed.to_matrix(), q @ torch.diag(half.eigenvalues[0]) @ q.T
    )
