"""Output-space curvature: loss-Hessian roots, loss gradients, sampled gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace.options import EKFACOptions
from ekfac_laplace.output_curvature import OutputCurvature, loss_gradient
from tests.utils import assert_close

F64 = torch.float64


def _batch(likelihood: str, n: int = 6, classes: int = 4):
    torch.manual_seed(0)
    f = torch.randn(n, classes, dtype=F64)
    if likelihood == "classification":
        return f, torch.randint(0, classes, (n,))
    return f, torch.randn(n, classes, dtype=F64)


def _curvature(f, y, likelihood, fisher_type="type2", mc_samples=1, seed=0):
    options = EKFACOptions(fisher_type=fisher_type, mc_samples=mc_samples)
    generator = torch.Generator().manual_seed(seed)
    return OutputCurvature(f, y, likelihood, options, generator)


def _loss_hessian(f: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Hessian of the summed torch loss w.r.t. each example's outputs."""
    if likelihood == "regression":
        eye = torch.eye(f.shape[1], dtype=f.dtype)
        return 2 * eye.expand(f.shape[0], -1, -1)
    p = f.softmax(-1)
    return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_exact_ggn_vectors_are_a_root_of_the_loss_hessian(likelihood):
    f, y = _batch(likelihood)
    curvature = _curvature(f, y, likelihood)
    v = curvature.vectors()
    # Cross-entropy's Hessian has rank C − 1: one backward pass fewer.
    assert v.shape == (6, 3 if likelihood == "classification" else 4, 4)
    assert_close(v.transpose(1, 2) @ v, _loss_hessian(f, likelihood))
    assert_close(curvature.gradient_factor(), _loss_hessian(f, likelihood).sum(0))
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64))
    assert_close(curvature.rotated_squares(q), (v @ q).square().sum(1))
    # Cross-entropy keeps only the probabilities: C numbers per example.
    numbers = 6 * 4 * (1 if likelihood == "classification" else 4)
    assert curvature.nbytes() == numbers * 8


@pytest.mark.parametrize("classes", [1, 2, 3, 10])
def test_softmax_root_is_exact_for_saturated_and_uniform_probabilities(classes):
    """``C − 1`` vectors give ``diag(p) − p pᵀ`` to rounding, whichever class wins."""
    torch.manual_seed(0)
    f = torch.randn(5, classes, dtype=F64) * 3
    f[1] = 0.0  # uniform
    f[2, -1] = 60.0  # the reflected class saturates: q_C → 1
    f[3, 0] = 60.0  # another class saturates: q_C → 0
    y = torch.zeros(5, dtype=torch.long)
    v = _curvature(f, y, "classification").vectors()
    assert v.shape == (5, max(classes - 1, 1), classes)
    error = (v.transpose(1, 2) @ v - _loss_hessian(f, "classification")).abs().max()
    assert error < 1e-15


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_empirical_vectors_are_the_loss_gradients(likelihood):
    f, y = _batch(likelihood)
    loss = (
        nn.CrossEntropyLoss(reduction="sum")
        if likelihood == "classification"
        else nn.MSELoss(reduction="sum")
    )
    leaf = f.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(loss(leaf, y), leaf)
    assert_close(loss_gradient(f, y, likelihood), expected)
    curvature = _curvature(f, y, likelihood, "empirical")
    assert_close(curvature.vectors(), expected.unsqueeze(1))
    assert_close(curvature.gradient_factor(), expected.T @ expected)  # Σ_n g_n g_nᵀ
    soft = torch.softmax(torch.randn(6, 4, dtype=F64), -1)
    assert_close(
        loss_gradient(f, soft, "classification"), f.softmax(-1) - soft
    )  # probability targets


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_sampled_vectors_are_seeded_and_their_mean_is_the_hessian(likelihood):
    f, y = _batch(likelihood)
    samples = 4000
    curvature = _curvature(f, y, likelihood, "mc", mc_samples=samples)
    v = curvature.vectors()
    assert v.shape == (6, samples, 4)
    again = _curvature(f, y, likelihood, "mc", mc_samples=samples).vectors()
    assert torch.equal(v, again)
    other = _curvature(f, y, likelihood, "mc", mc_samples=samples, seed=1).vectors()
    assert not torch.equal(v, other)
    # Σ_s v vᵀ (the 1/√S is inside v) estimates the loss Hessian; the entries'
    # Monte-Carlo error is about |H| / √S ≈ 0.016–0.03 here.
    estimate = v.transpose(1, 2) @ v
    hessian = _loss_hessian(f, likelihood)
    scale = hessian.abs().amax(dim=(1, 2), keepdim=True)
    assert ((estimate - hessian).abs() / scale).max() < 0.1


def test_the_exact_ggn_of_a_vocabulary_is_refused_before_its_vectors_are_built(
    monkeypatch,
):
    import ekfac_laplace.output_curvature as module

    monkeypatch.setattr(module, "VECTORS_LIMIT_BYTES", 10_000)  # a small stand-in
    f, y = torch.randn(4, 60), torch.randint(0, 60, (4,))
    generator = torch.Generator().manual_seed(0)
    exact = OutputCurvature(f, y, "classification", EKFACOptions(), generator)
    with pytest.raises(MemoryError, match=r"exact GGN of 60 classes.*stochastic"):
        exact.vectors()
    sampled = OutputCurvature(
        f, y, "classification", EKFACOptions(fisher_type="mc"), generator
    )
    assert sampled.vectors().shape == (4, 1, 60)
