"""Exact (dense) blocks of small parameter tensors, against the dense float64 reference.

With ``dense_blocks_up_to`` every small tensor's block is its exact GGN / Fisher
block; the others keep their EKFAC blocks. The whole posterior must equal that dense
construction: the precision, its log determinant and the evidence, the GLM variance
and the samples' covariance; online fits, the state and distributed fits too
(``tests/test_distributed.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
from laplace import Laplace
from torch import Tensor, nn

from ekfac_laplace import EKFACLaplace, compute_ekfac
from ekfac_laplace.batches import LaplaceBatches
from ekfac_laplace.options import EKFACOptions
from tests.cases import loader
from tests.utils import (
    assert_close,
    blocks,
    corrected_eigenvalues,
    dense_empirical_fisher,
    dense_ggn,
    glm_log_likelihood,
    jacobians,
    loop_ggn,
    mc_fisher_moments,
)


class Mixed(nn.Module):
    """Every kind of block: a hidden Linear (EKFAC), a LayerNorm and an embedding
    (per-example gradients of a module), a grouped and a transposed convolution, and
    an output Linear (closed form, no backward pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 2)
        self.conv = nn.Conv1d(4, 4, 2, groups=2)
        self.up = nn.ConvTranspose1d(4, 2, 2, stride=2)
        self.hidden = nn.Linear(12, 9)
        self.norm = nn.LayerNorm(9)
        self.out = nn.Linear(9, 3)

    def forward(self, x: Tensor) -> Tensor:
        tokens, signal = x[:, :2].long().clamp(0, 4), x[:, 2:].reshape(-1, 4, 4)
        h = torch.tanh(self.up(torch.tanh(self.conv(signal)))).flatten(1)  # (B, 6)
        h = torch.cat([h, self.embed(tokens).flatten(1)], dim=1)[:, :12]
        return self.out(torch.tanh(self.norm(self.hidden(h))))


def _data(n: int = 14, seed: int = 0):
    torch.manual_seed(seed)
    model = Mixed().double().eval()
    X = torch.cat(
        [torch.randint(0, 5, (n, 2)).double(), torch.randn(n, 16, dtype=torch.float64)],
        dim=1,
    )
    return model, X, torch.randint(0, 3, (n,))


#: Up to 40 entries: the embedding, the norm, the convolutions, every bias and
#: the output weight (27); the hidden weight (108) keeps its EKFAC block.
UP_TO = 40


def _reference(la, X, y, fisher_type: str = "type2") -> Tensor:
    """The posterior precision built densely: the exact block of every small
    tensor, EKFAC in the fitted basis for the others, plus the prior."""
    model, params = la.model, list(la.params)
    full = (
        dense_ggn(model, params, X, "classification")
        if fisher_type == "type2"
        else dense_empirical_fisher(model, params, X, y, "classification")
    )
    parts = []
    for param, block, basis in zip(
        params, blocks(full, [p.numel() for p in params]), la.H.eigenvectors
    ):
        if param.numel() <= UP_TO:
            assert len(basis) == 1 and basis[0].shape == (param.numel(),) * 2
            parts.append(block)
        else:
            Q = torch.kron(*basis)
            parts.append((Q * corrected_eigenvalues(block, basis)) @ Q.T)
    return torch.block_diag(*parts) + torch.diag(la.prior_precision_diag)


@pytest.mark.parametrize("fisher_type", ["type2", "empirical"])
def test_the_posterior_is_the_dense_construction(fisher_type: str):
    from laplace.curvature import CurvlinopsEF

    model, X, y = _data()
    backend = {"backend": CurvlinopsEF} if fisher_type == "empirical" else {}
    la = EKFACLaplace(
        model,
        "classification",
        prior_precision=0.4,
        dense_blocks_up_to=UP_TO,
        **backend,
    )
    la.fit(loader(X, y))
    precision = _reference(la, X, y, fisher_type)
    torch.testing.assert_close(
        la.posterior_precision.to_matrix(), precision, rtol=1e-8, atol=1e-10
    )
    assert_close(la.log_det_posterior_precision, torch.logdet(precision))
    # The evidence: log p(D|θ*) − ½ (log det P − log det P₀ + δ‖θ*‖²).
    with torch.no_grad():
        f = model(X)
    expected = glm_log_likelihood(f, y, "classification", 1.0, 1.0) - 0.5 * (
        torch.logdet(precision)
        - la.n_params * math.log(0.4)
        + 0.4 * la.mean.square().sum()
    )
    assert_close(la.log_marginal_likelihood(), expected)
    covariance = torch.linalg.inv(precision)
    J, _ = jacobians(model, list(la.params), X[:5])
    for joint in (False, True):
        _, variance = la._glm_predictive_distribution(X[:5], joint=joint)
        if joint:
            flat = J.reshape(-1, J.shape[-1])
            assert_close(variance, flat @ covariance @ flat.T, "float64_loose")
        else:
            assert_close(variance, J @ covariance @ J.transpose(1, 2), "float64_loose")
    root = la.posterior_precision.eigenbasis_matmul(
        torch.eye(la.n_params, dtype=torch.float64)
    )
    assert_close(root.T @ root, covariance, "float64_loose")


def test_an_online_fit_rebuilds_exact_blocks_and_keeps_ekfac_s_bases():
    model, X, y = _data()
    la = EKFACLaplace(model, "classification", dense_blocks_up_to=UP_TO)
    la.fit(loader(X[:7], y[:7]))
    first = [basis for basis in la.H.eigenvectors]
    la.fit(loader(X[7:], y[7:]), override=False)
    params = list(model.parameters())
    full = dense_ggn(model, params, X[:7], "classification") + dense_ggn(
        model, params, X[7:], "classification"
    )
    for param, block, basis, values, old in zip(
        params,
        blocks(full, [p.numel() for p in params]),
        la.H.eigenvectors,
        la.H.eigenvalues,
        first,
    ):
        if param.numel() <= UP_TO:  # exact: the union's block
            (q,) = basis
            assert_close((q * values) @ q.T, block)
        else:  # EKFAC: the first fit's basis, the union's corrected eigenvalues
            assert all(torch.equal(a, b) for a, b in zip(basis, old))
            assert_close(values.flatten(), corrected_eigenvalues(block, basis))


def test_the_monte_carlo_fisher_s_exact_blocks_are_unbiased():
    """The diagonal of a Monte-Carlo exact block against the exact moments of the
    one-label estimator (the identity basis), 128 labels per example."""
    model, X, y = _data()
    params = list(model.parameters())
    factors = compute_ekfac(
        model,
        params,
        LaplaceBatches(loader(X, y)),
        "classification",
        len(X),
        EKFACOptions(
            fisher_type="mc", mc_samples=128, seed=0, dense_blocks_up_to=UP_TO
        ),
    )
    small = [i for i, p in enumerate(params) if p.numel() <= UP_TO]
    identity = [(torch.eye(params[i].numel(), dtype=torch.float64),) for i in small]
    means, variances = mc_fisher_moments(
        model, [params[i] for i in small], X, "classification", identity
    )
    for i, mean, variance in zip(small, means, variances):
        (q,) = factors.eigenvectors[i]
        estimate = torch.diagonal((q * factors.eigenvalues[i]) @ q.T)
        error = (estimate - mean).abs()
        standard_error = (variance / 128).sqrt()
        degenerate = standard_error < 1e-12
        assert (error[degenerate] < 1e-10).all()
        if (~degenerate).any():
            assert (error[~degenerate] / standard_error[~degenerate]).max() < 5.0


def test_the_last_layer_exact_and_the_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    la = Laplace(model, "classification", "last_layer", "ekfac", dense_blocks_up_to=100)
    la.fit(loader(X, y))
    params = list(la.model.last_layer.parameters())
    exact = blocks(
        loop_ggn(la.model.model, params, X, "classification"),
        [p.numel() for p in params],
    )
    for block, (q,), values in zip(exact, la.H.eigenvectors, la.H.eigenvalues):
        assert_close((q * values) @ q.T, block)
    fresh = Laplace(
        la.model.model, "classification", "last_layer", "ekfac", dense_blocks_up_to=100
    )
    fresh.load_state_dict(la.state_dict())
    assert torch.equal(fresh(X[:3]), la(X[:3]))


def test_refusals_and_what_dense_blocks_do_not_refuse():
    model, X, y = _data()
    la = EKFACLaplace(
        model, "classification", engine="curvlinops", dense_blocks_up_to=UP_TO
    )
    with pytest.raises(ValueError, match=r"no exact blocks.*dense_blocks_up_to"):
        la.fit(loader(X, y))
    with pytest.raises(ValueError, match="dense_blocks_up_to must be a non-negative"):
        EKFACLaplace(model, "classification", dense_blocks_up_to=-1)
    # A LayerNorm with an exact block is not refused by unsupported_layers="raise".
    torch.manual_seed(0)
    normed = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    EKFACLaplace(
        normed, "classification", unsupported_layers="raise", dense_blocks_up_to=5
    ).fit(loader(X, y))
    with pytest.raises(ValueError, match="belongs to a LayerNorm"):
        EKFACLaplace(normed, "classification", unsupported_layers="raise").fit(
            loader(X, y)
        )


def test_an_exact_block_too_large_for_memory_is_refused_before_any_work() -> None:
    model = nn.Sequential(nn.Linear(30_000, 2)).double()
    X, y = torch.zeros(4, 30_000, dtype=torch.float64), torch.zeros(4).long()
    la = EKFACLaplace(model, "classification", dense_blocks_up_to=10**6)
    with pytest.raises(MemoryError, match="exact block of 60000 × 60000"):
        la.fit(loader(X, y))
    assert la.H is None
