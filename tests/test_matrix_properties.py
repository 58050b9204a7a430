"""Property tests: every EKFACDecomposed operation against its dense equivalent.

Hypothesis draws the block structure (weight blocks ``(Q_G, Q_A)``, bias blocks
``(Q_G,)`` and identity-basis diagonal blocks ``()`` of any shape), the eigenvalues
(spanning several orders of magnitude, zeros included), the deltas, a scale and the
exponent; the dense reference is ``Q diag((cλ + cδ)^p) Qᵀ`` built with ``torch.kron``
and ``block_diag`` in float64. Examples are derandomized so CI is reproducible.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ekfac_laplace.matrix import EKFACDecomposed

EXPONENTS = st.sampled_from([1.0, -1.0, -0.5, 0.5, 2.0, -2.0, 0.25])
RTOL = 1e-9


@st.composite
def matrices(draw) -> tuple[EKFACDecomposed, list[torch.Tensor], torch.Tensor]:
    """An EKFACDecomposed, its dense blocks' bases, and its deltas."""
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    kinds = draw(
        st.lists(
            st.sampled_from(["weight", "bias", "diagonal"]), min_size=1, max_size=4
        )
    )
    eigenvectors, eigenvalues, bases = [], [], []
    for kind in kinds:
        if kind == "diagonal":
            shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
            basis: tuple[torch.Tensor, ...] = ()
            Q = torch.eye(math.prod(shape), dtype=torch.float64)
        else:
            d_out = draw(st.integers(1, 4))
            d_in = draw(st.integers(1, 4))
            q_g = torch.linalg.qr(
                torch.randn(d_out, d_out, generator=generator, dtype=torch.float64)
            ).Q
            if kind == "weight":
                q_a = torch.linalg.qr(
                    torch.randn(d_in, d_in, generator=generator, dtype=torch.float64)
                ).Q
                basis, shape, Q = (q_g, q_a), (d_out, d_in), torch.kron(q_g, q_a)
            else:
                basis, shape, Q = (q_g,), (d_out,), q_g
        # Eigenvalues over many orders of magnitude, some exactly zero.
        log_scale = torch.empty(shape, dtype=torch.float64).uniform_(
            -4, 4, generator=generator
        )
        values = 10.0**log_scale
        values[torch.rand(shape, generator=generator) < 0.2] = 0.0
        eigenvectors.append(basis)
        eigenvalues.append(values)
        bases.append(Q)
    deltas = torch.tensor(
        draw(st.lists(st.floats(1e-3, 1e3), min_size=len(kinds), max_size=len(kinds))),
        dtype=torch.float64,
    )
    matrix = EKFACDecomposed(eigenvectors, eigenvalues)
    return matrix, bases, deltas


def _dense(
    matrix: EKFACDecomposed, bases: list[torch.Tensor], exponent: float
) -> torch.Tensor:
    blocks = []
    for index, Q in enumerate(bases):
        powered = matrix.damped_eigenvalues(index).flatten() ** exponent
        blocks.append((Q * powered) @ Q.T)
    return torch.block_diag(*blocks)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().clamp_min(1e-300)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * float(scale))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(matrices(), EXPONENTS, st.floats(0.01, 100.0))
def test_operations_match_the_dense_matrix(drawn, exponent, scale):
    base, bases, deltas = drawn
    matrix = base * scale + deltas
    dense = _dense(matrix, bases, exponent)
    P = matrix.n_params
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(3, 2, P, generator=generator, dtype=torch.float64)

    _close(matrix.to_matrix(exponent), dense)
    _close(matrix.diag(exponent), torch.diagonal(dense))
    _close(matrix.bmm(W[0, 0], exponent), dense @ W[0, 0])
    _close(matrix.bmm(W[0], exponent), W[0] @ dense)
    _close(matrix.bmm(W, exponent), W @ dense)
    _close(matrix.square_form(W, exponent), W @ dense @ W.transpose(1, 2))
    if exponent == 1.0:
        inverse = _dense(matrix, bases, -1.0)
        torch.testing.assert_close(inverse @ dense, torch.eye(P, dtype=dense.dtype))
        _close(matrix.inv_square_form(W), W @ inverse @ W.mT)
        sign, logabsdet = torch.linalg.slogdet(dense)
        assert sign == 1
        # The dense reference loses accuracy with the condition number.
        damped = torch.cat(
            [matrix.damped_eigenvalues(i).flatten() for i in range(len(matrix))]
        )
        condition = float(damped.max() / damped.min())
        atol = max(1e-9, 1e-14 * P * condition)
        torch.testing.assert_close(matrix.logdet(), logabsdet, rtol=0, atol=atol)
    # Sampling map: S Sᵀ = M^(2·exponent) with S = Q diag(d^exponent).
    identity = torch.eye(P, dtype=torch.float64)
    S = matrix.eigenbasis_matmul(identity, exponent).T
    _close(S @ S.T, _dense(matrix, bases, 2 * exponent))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(matrices(), st.floats(0.01, 100.0), st.floats(0.01, 100.0))
def test_scaling_and_adding_compose_like_matrices(drawn, first, second):
    base, bases, deltas = drawn
    composed = (base * first + deltas) * second
    expected = second * (first * _dense(base, bases, 1.0) + _block_deltas(deltas, base))
    _close(composed.to_matrix(), expected)
    assert len(composed) == len(base)
    assert composed.block_sizes == base.block_sizes


def _block_deltas(deltas: torch.Tensor, matrix: EKFACDecomposed) -> torch.Tensor:
    return torch.diag(
        torch.repeat_interleave(deltas, torch.as_tensor(matrix.block_sizes))
    )
