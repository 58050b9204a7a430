"""A diagonal plus low-rank matrix against its dense float64 construction."""

from __future__ import annotations

import pytest
import torch

from ekfac_laplace import lowrank

N, K = 12, 3


def assert_close(actual, expected, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Equal in float64 to the issue's ``1e-10``, relative."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _parts(seed: int = 0, zero_direction: bool = False):
    generator = torch.Generator().manual_seed(seed)
    lam = torch.rand(N, generator=generator, dtype=torch.float64) + 0.1
    U, _ = torch.linalg.qr(torch.randn(N, K, generator=generator, dtype=torch.float64))
    S = torch.rand(K, generator=generator, dtype=torch.float64) * 5
    if zero_direction:
        S[-1] = 0.0  # a rank below k: Woodbury must not divide by it
    return lam, U, S


def _dense(lam, V):
    return torch.diag(lam) + V @ V.mT


@pytest.mark.parametrize("zero_direction", [False, True])
def test_products_inverse_and_diagonal_equal_the_dense_matrix(zero_direction):
    lam, U, S = _parts(zero_direction=zero_direction)
    V = U * S.sqrt()
    M = _dense(lam, V)
    X = torch.randn(4, N, dtype=torch.float64)  # rows
    assert_close(lowrank.matmul(lam, V, X), X @ M.mT, rtol=1e-12, atol=1e-12)
    inverse = torch.linalg.inv(M)
    assert_close(lowrank.inverse_matmul(lam, V, X), X @ inverse.mT, rtol=1e-10)
    assert_close(lowrank.inverse_diagonal(lam, V), inverse.diagonal(), rtol=1e-10)
    assert_close(lowrank.logdet(lam, V), torch.logdet(M), rtol=1e-12)


def test_the_sampling_factor_has_the_inverse_as_its_square():
    lam, U, S = _parts()
    V = U * S.sqrt()
    rows = lowrank.inverse_factor_matmul(lam, V, torch.eye(N, dtype=torch.float64))
    A = rows.mT  # row i is A e_i
    assert_close(A @ A.mT, torch.linalg.inv(_dense(lam, V)), rtol=1e-10, atol=1e-12)


def test_the_log_determinant_is_differentiable_in_prior_and_scale():
    lam0, U, S = _parts()
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    prior = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def structured():
        return lowrank.logdet(scale * lam0 + prior, U * (scale * S).sqrt())

    def dense():
        M = scale * (torch.diag(lam0) + U @ torch.diag(S) @ U.mT) + prior * torch.eye(
            N, dtype=torch.float64
        )
        return torch.logdet(M)

    grads = torch.autograd.grad(structured(), (scale, prior))
    expected = torch.autograd.grad(dense(), (scale, prior))
    for got, want in zip(grads, expected):
        assert_close(got, want, rtol=1e-10)


def test_rank_zero_is_the_diagonal():
    lam, _, _ = _parts()
    V = torch.zeros(N, 0, dtype=torch.float64)
    X = torch.randn(2, N, dtype=torch.float64)  # rows
    assert_close(lowrank.inverse_matmul(lam, V, X), X / lam)
    assert_close(lowrank.logdet(lam, V), lam.log().sum())
    assert_close(lowrank.inverse_diagonal(lam, V), 1 / lam)


def _psd(rank: int, decay: float = 1.0, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(rank, N, generator=generator, dtype=torch.float64)
    rows = rows * decay ** torch.arange(rank, dtype=torch.float64).unsqueeze(-1)
    return rows.mT @ rows


def _gaussian(rows: int, columns: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, columns, generator=generator, dtype=torch.float64)


def test_nystrom_recovers_a_matrix_of_rank_within_the_sketch():
    R = _psd(rank=4)
    omega = _gaussian(N, 6)
    U, S = lowrank.nystrom_eigenpairs(R @ omega, omega, rank=6)
    assert_close(U @ torch.diag(S) @ U.mT, R, rtol=1e-8, atol=1e-9)
    assert_close(U.mT @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-10)
    top = torch.linalg.eigvalsh(R).flip(0)[: len(S)]
    assert_close(S, top, rtol=1e-8, atol=1e-9)


def test_nystrom_stays_below_the_matrix_and_finds_its_top_directions():
    R = _psd(rank=N, decay=0.6)
    omega = _gaussian(N, 8)
    U, S = lowrank.nystrom_eigenpairs(R @ omega, omega, rank=3)
    assert U.shape == (N, 3) and bool((S[:-1] >= S[1:]).all())
    residual = R - U @ torch.diag(S) @ U.mT
    assert float(torch.linalg.eigvalsh(residual).min()) > -1e-10  # R̂ ≼ R
    assert bool((residual.diagonal() >= -1e-12).all())
    values, vectors = torch.linalg.eigh(R)
    assert_close(S, values.flip(0)[:3], rtol=1e-2)  # a randomized estimate
    overlap = (vectors[:, -3:].mT @ U).abs().max(1).values  # each top direction
    assert bool((overlap > 0.99).all())


def test_orthonormal_columns_of_an_ill_conditioned_matrix():
    Y = _gaussian(N, 5) * torch.tensor(
        [1.0, 1e-3, 1e-6, 1.0, 10.0], dtype=torch.float64
    )
    Q = lowrank.orthonormal_columns(Y)
    assert_close(Q.mT @ Q, torch.eye(5, dtype=torch.float64), atol=1e-10)
    projector = Q @ Q.mT  # the same range
    assert_close(projector @ Y, Y, rtol=1e-8, atol=1e-10)
