"""EKFACDecomposed against its dense equivalent."""

from __future__ import annotations

import pytest
import torch

from ekfac_laplace.matrix import EKFACDecomposed
from tests.utils import assert_close


def _orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q


def _random_ekfac(
    shapes=((3, 4), (3,), (2, 5), (2,)), seed: int = 0
) -> EKFACDecomposed:
    generator = torch.Generator().manual_seed(seed)
    eigenvectors, eigenvalues = [], []
    for shape in shapes:
        eigenvectors.append(tuple(_orthogonal(n, generator) for n in shape))
        eigenvalues.append(
            torch.rand(*shape, generator=generator, dtype=torch.float64) * 3
        )
    return EKFACDecomposed(eigenvectors, eigenvalues)


def _dense(matrix: EKFACDecomposed, deltas: torch.Tensor) -> torch.Tensor:
    """Built from scratch: Q diag(λ) Qᵀ + δ I per block."""
    blocks = []
    for basis, values, delta in zip(matrix.eigenvectors, matrix.eigenvalues, deltas):
        Q = torch.kron(*basis) if len(basis) == 2 else basis[0]
        blocks.append(
            Q @ torch.diag(values.flatten()) @ Q.T
            + delta * torch.eye(len(Q), dtype=torch.float64)
        )
    return torch.block_diag(*blocks).double()


def _matrix_power(dense: torch.Tensor, exponent: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(dense)
    return (evecs * evals.pow(exponent)) @ evecs.T


DELTAS = [torch.tensor(0.7), torch.tensor([0.3]), torch.tensor([0.1, 0.5, 1.0, 2.0])]


@pytest.mark.parametrize("delta", DELTAS, ids=["scalar", "length1", "per_block"])
def test_dense_quantities(delta: torch.Tensor):
    base = _random_ekfac()
    matrix = base + delta.double()
    per_block = delta.double().reshape(-1).expand(len(base))
    dense = _dense(base, per_block)
    assert_close(matrix.to_matrix(), dense)
    assert_close(matrix.logdet(), torch.linalg.slogdet(dense).logabsdet)
    for exponent in (1, -1, -0.5, 0.5, 2.3):
        powered = _matrix_power(dense, exponent)
        assert_close(matrix.to_matrix(exponent), powered)
        assert_close(matrix.diag(exponent), torch.diagonal(powered))
        W = torch.randn(6, 2, matrix.n_params, dtype=torch.float64)
        assert_close(matrix.bmm(W, exponent), W @ powered)
        assert_close(matrix.bmm(W[:, 0], exponent), W[:, 0] @ powered)
        assert_close(matrix.bmm(W[0, 0], exponent), W[0, 0] @ powered)
        assert_close(matrix.square_form(W, exponent), W @ powered @ W.transpose(1, 2))
    W = torch.randn(4, 3, matrix.n_params, dtype=torch.float64)
    assert_close(
        matrix.inv_square_form(W), W @ torch.linalg.inv(dense) @ W.transpose(1, 2)
    )


def test_bmm_keeps_batch_of_one():
    matrix = _random_ekfac() + torch.tensor(1.0, dtype=torch.float64)
    W = torch.randn(1, matrix.n_params, dtype=torch.float64)
    assert matrix.bmm(W).shape == (1, matrix.n_params)


def test_scalar_multiplication_scales_eigenvalues_and_deltas():
    base = _random_ekfac() + torch.tensor(0.5, dtype=torch.float64)
    scaled = base * 3.0
    assert_close(scaled.to_matrix(), 3.0 * base.to_matrix())
    assert_close((2.0 * base).to_matrix(), 2.0 * base.to_matrix())
    assert_close(
        (base + 1.0).to_matrix(),
        base.to_matrix() + torch.eye(base.n_params, dtype=torch.float64),
    )
    assert len(base) == 4
    assert base.n_params == 12 + 3 + 10 + 2


def test_eigenbasis_sampling_has_the_inverse_as_covariance():
    matrix = _random_ekfac() + torch.tensor(0.4, dtype=torch.float64)
    identity = torch.eye(matrix.n_params, dtype=torch.float64)
    # Q D^{-1/2} (Q D^{-1/2})ᵀ = M^{-1}: the sampling map is an exact square root.
    root = matrix.eigenbasis_matmul(identity, exponent=-0.5)
    assert_close(root.T @ root, matrix.to_matrix(-1))


def test_gradients_flow_through_deltas_and_scalar():
    base = _random_ekfac()
    delta = torch.tensor([0.5, 0.6, 0.7, 0.8], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (base * scale + delta).logdet().backward()
    dense_delta = delta.detach().clone().requires_grad_(True)
    dense_scale = scale.detach().clone().requires_grad_(True)
    blocks = []
    for basis, values, d in zip(base.eigenvectors, base.eigenvalues, dense_delta):
        Q = torch.kron(*basis) if len(basis) == 2 else basis[0]
        blocks.append(
            dense_scale * Q @ torch.diag(values.flatten()) @ Q.T
            + d * torch.eye(len(Q), dtype=torch.float64)
        )
    torch.linalg.slogdet(torch.block_diag(*blocks)).logabsdet.backward()
    assert_close(delta.grad, dense_delta.grad)
    assert_close(scale.grad, dense_scale.grad)


def test_detach():
    base = _random_ekfac()
    delta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    matrix = (base + delta).detach()
    assert not matrix.deltas.requires_grad


def test_bad_input_is_refused():
    base = _random_ekfac()
    with pytest.raises(ValueError, match="at least one block"):
        EKFACDecomposed([], [])
    with pytest.raises(ValueError, match="2 eigenvector tuples but 1"):
        EKFACDecomposed(base.eigenvectors[:2], base.eigenvalues[:1])
    with pytest.raises(ValueError, match="eigenbasis needs"):
        EKFACDecomposed(base.eigenvectors[:1], [torch.ones(4, 3)])
    with pytest.raises(ValueError, match="square matrices"):
        EKFACDecomposed([(torch.ones(2, 3),)], [torch.ones(2)])
    with pytest.raises(ValueError, match="one entry per block"):
        base + torch.ones(3)
    with pytest.raises(ValueError, match="scalar or a tensor"):
        base + "one"
    with pytest.raises(ValueError, match="by a scalar"):
        base * torch.ones(2)
    with pytest.raises(ValueError, match="by a scalar"):
        base * "two"
    with pytest.raises(ValueError, match="has 27 parameters"):
        base.bmm(torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"\(P,\), \(B, P\) or \(B, K, P\)"):
        base.bmm(torch.ones(1, 1, 1, 27))
    with pytest.raises(ValueError, match=r"\(B, K, P\)"):
        base.square_form(torch.ones(27))


def test_deltas_must_be_a_tensor():
    base = _random_ekfac()
    with pytest.raises(ValueError, match="deltas must be a torch.Tensor"):
        EKFACDecomposed(base.eigenvectors, base.eigenvalues, deltas=[1.0, 2.0])


def test_lazy_scale_survives_addition_and_repeated_multiplication():
    base = _random_ekfac()
    delta = torch.tensor(0.3, dtype=torch.float64)
    chained = (base * 2.0 + delta) * torch.tensor(1.5, dtype=torch.float64)
    identity = torch.eye(base.n_params, dtype=torch.float64)
    assert_close(chained.to_matrix(), 1.5 * (2.0 * base.to_matrix() + 0.3 * identity))
    assert chained.eigenvalues[0] is base.eigenvalues[0]  # no copy of the spectrum


def test_state_round_trip_is_plain_tensors():
    matrix = _random_ekfac(shapes=((3, 4), (3,)))
    identity = EKFACDecomposed([()], [torch.rand(2, 2, dtype=torch.float64)])
    matrix = EKFACDecomposed(
        [*matrix.eigenvectors, ()], [*matrix.eigenvalues, identity.eigenvalues[0]]
    )  # a weight, a bias and a diagonal block
    state = matrix.to_state()
    assert isinstance(state, list)
    assert all(isinstance(t, torch.Tensor) for block in state for t in block)
    assert [len(block) for block in state] == [3, 2, 1]
    restored = EKFACDecomposed.from_state(state)
    assert_close(restored.to_matrix(), matrix.to_matrix())
    for bad in (None, [], [("not a tensor",)], {"eigenvectors": []}, [()]):
        with pytest.raises(ValueError, match="no EKFAC eigenvectors and eigenvalues"):
            EKFACDecomposed.from_state(bad)


def _corrected(seed: int = 0, scale: float | None = None):
    """Blocks: weight, bias, grouped weight (G = 2), diagonal; three corrected.

    Returns the matrix and its dense precision built from scratch: per block
    ``Q (diag(c λ + δ) + c U diag(S) Uᵀ) Qᵀ``.
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    grouped = tuple(
        torch.stack([_orthogonal(n, generator) for _ in range(2)]) for n in (2, 3)
    )
    eigenvectors = [
        (_orthogonal(3, generator), _orthogonal(4, generator)),
        (_orthogonal(3, generator),),
        grouped,
        (),
    ]
    eigenvalues = [rand(3, 4) * 2, rand(3) * 2, rand(2, 2, 3) * 2, rand(5) * 2]
    corrections = []
    for values, k in zip(eigenvalues, (3, 2, 4, None)):
        if k is None:
            corrections.append(None)
            continue
        n = values.numel()
        U, _ = torch.linalg.qr(
            torch.randn(n, k, generator=generator, dtype=torch.float64)
        )
        S = rand(k) * 4
        S[-1] = 0.0  # a direction of the sketch without curvature
        corrections.append((U, S))
    deltas = torch.tensor([0.3, 0.5, 0.2, 0.7], dtype=torch.float64)
    matrix = EKFACDecomposed(eigenvectors, eigenvalues, corrections=corrections)
    matrix = (matrix if scale is None else matrix * scale) + deltas
    c = 1.0 if scale is None else scale
    blocks = []
    for basis, values, correction, delta in zip(
        eigenvectors, eigenvalues, corrections, deltas
    ):
        inner = torch.diag(c * values.flatten() + delta)
        if correction is not None:
            U, S = correction
            inner = inner + c * U @ torch.diag(S) @ U.T
        if not basis:
            Q = torch.eye(values.numel(), dtype=torch.float64)
        elif basis[0].ndim == 3:
            Q = torch.block_diag(*[torch.kron(g, a) for g, a in zip(*basis)])
        else:
            Q = torch.kron(*basis) if len(basis) == 2 else basis[0]
        blocks.append(Q @ inner @ Q.T)
    return matrix, torch.block_diag(*blocks)


def _tight(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [None, 0.6])
def test_low_rank_corrected_blocks_equal_their_dense_construction(scale):
    matrix, dense = _corrected(scale=scale)
    inverse = torch.linalg.inv(dense)
    P = len(dense)
    W = torch.randn(2, 3, P, dtype=torch.float64)
    _tight(matrix.to_matrix(), dense)
    _tight(matrix.to_matrix(-1), inverse)
    _tight(matrix.bmm(W, exponent=1), W @ dense)
    _tight(matrix.bmm(W, exponent=-1), W @ inverse)
    _tight(matrix.square_form(W), W @ dense @ W.mT)
    _tight(matrix.inv_square_form(W), W @ inverse @ W.mT)
    _tight(matrix.diag(), dense.diagonal())
    _tight(matrix.diag(-1), inverse.diagonal())
    _tight(matrix.logdet(), torch.logdet(dense))
    factor = matrix.eigenbasis_matmul(torch.eye(P, dtype=torch.float64)).mT
    _tight(factor @ factor.mT, inverse)  # samples Q A z have covariance M⁻¹


def test_low_rank_log_determinant_gradients_equal_the_dense_ones():
    damped, _ = _corrected()
    base = EKFACDecomposed(
        damped.eigenvectors, damped.eigenvalues, corrections=damped.corrections
    )
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    prior = torch.tensor([0.3, 0.5, 0.2, 0.7], dtype=torch.float64, requires_grad=True)
    structured = torch.autograd.grad((base * scale + prior).logdet(), (scale, prior))
    blocks = []
    for index in range(len(base)):
        single = EKFACDecomposed(
            [base.eigenvectors[index]],
            [base.eigenvalues[index]],
            corrections=[base.corrections[index]],
        )
        blocks.append(single.to_matrix())  # c = 1, δ = 0
    sizes = [len(b) for b in blocks]
    prior_diag = torch.cat([p.expand(n) for p, n in zip(prior, sizes)])
    dense = scale * torch.block_diag(*blocks) + torch.diag(prior_diag)
    expected = torch.autograd.grad(torch.logdet(dense), (scale, prior))
    for got, want in zip(structured, expected):
        _tight(got, want)


def test_rank_zero_corrections_are_plain_ekfac():
    matrix, _ = _corrected()
    plain = EKFACDecomposed(matrix.eigenvectors, matrix.eigenvalues) + matrix.deltas
    empty = [None if c is None else (c[0][:, :0], c[1][:0]) for c in matrix.corrections]
    zero = EKFACDecomposed(matrix.eigenvectors, matrix.eigenvalues, corrections=empty)
    zero = zero + matrix.deltas
    _tight(zero.to_matrix(-1), plain.to_matrix(-1))
    _tight(zero.logdet(), plain.logdet())
    _tight(zero.diag(-1), plain.diag(-1))


def test_corrected_blocks_refuse_what_is_not_exact():
    matrix, _ = _corrected()
    with pytest.raises(ValueError, match="Block 0 has a low-rank correction"):
        matrix.bmm(torch.randn(matrix.n_params, dtype=torch.float64), exponent=0.5)
    with pytest.raises(ValueError, match="exact for the powers 1 and -1"):
        matrix.diag(-0.5)
    with pytest.raises(ValueError, match="cannot be saved"):
        matrix.to_state()
    with pytest.raises(ValueError, match="Block 1: a correction needs U of shape"):
        EKFACDecomposed(
            matrix.eigenvectors,
            matrix.eigenvalues,
            corrections=[None, (torch.zeros(4, 1), torch.zeros(1)), None, None],
        )
